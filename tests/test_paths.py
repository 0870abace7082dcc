"""Every repository path that the README, docs/, conf/ and sweeps/ comments and the package's docstrings and comments
name exists: a renamed module must not leave readers looking for the old one."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

ROOTS = ("hpa_lightning", "tests", "conf", "docs", "sweeps", ".ci")
# a path that starts at one of the repository's top-level folders and names a file or folder in it
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(r) for r in ROOTS) + r")/[\w./-]*[\w/])")


def documents() -> list[Path]:
    found = [REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "sweeps").rglob("*"),
             *(REPO / "conf").rglob("*.yaml"), *(REPO / "hpa_lightning").rglob("*.py"), *(REPO / "tests").rglob("*.py"),
             REPO / "Makefile"]
    return [path for path in found if path.is_file()]


# a path broken after a slash at the end of a line (docstrings wrap at 120 columns): joined again before matching
WRAPPED = re.compile(r"/\n[ \t#]*(?=[\w./-]+\.(?:py|pyi|yaml|md|csv|txt|sh)\b)")


def named_paths(text: str, wrapped: bool = False) -> set[str]:
    """The paths `text` names; `wrapped` (Python sources) also those broken after a slash at a line's end (in
    Markdown such a line ends a folder of a listing, not a path)."""
    names = set()
    text = WRAPPED.sub("/", text) if wrapped else text
    for match in PATH.finditer(text):
        name = match.group(1).rstrip("/.")
        following = text[match.end():match.end() + 1]
        if following in ("*", "<", "{", "$") or "..." in name or name.endswith(("/NAME.yaml", "/X.py")):
            continue  # a pattern, not a path
        names.add(name)
    return names


def test_every_named_path_exists() -> None:
    missing = []
    for document in documents():
        text = document.read_text(errors="replace")
        for name in sorted(named_paths(text, wrapped=document.suffix == ".py")):
            if not (REPO / name).exists():
                missing.append(f"{document.relative_to(REPO)}: {name}")
    assert not missing, "\n".join(missing)


def test_the_check_sees_paths_and_skips_patterns() -> None:
    assert named_paths("see hpa_lightning/models/net.py and conf/data/*.yaml, docs/results/<run>") == {
        "hpa_lightning/models/net.py"}
    assert named_paths("(tests/training/test_ddp.py)") == {"tests/training/test_ddp.py"}
    assert named_paths("(hpa_lightning/reporting/\n    cam.py) and hpa_lightning/data/\nThe", wrapped=True) == {
        "hpa_lightning/reporting/cam.py", "hpa_lightning/data"}
