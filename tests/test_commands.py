"""One console script, `hpa`, for every command, and `--help` on each of them (exit 0, its own help)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpa_lightning.commands import COMMANDS, main, summary_line
from tests.conftest import REPO


def test_hpa_help_lists_every_command_with_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert set(listed) == set(COMMANDS)
    for name, module in COMMANDS.items():
        assert summary_line(module) and "python -m" not in listed[name], listed[name]


def test_an_unknown_command_is_one_line_with_a_suggestion(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["pedict"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and err.count("\n") == 0 and "did you mean predict?" in err


def test_every_command_takes_help(tmp_path: Path) -> None:
    """Through the installed `hpa` script (the venv's bin, beside this interpreter) and `python -m`, in parallel."""
    script = Path(sys.executable).parent / "hpa"
    assert script.is_file(), "the console script is declared in pyproject.toml: pip install -e . creates it"
    env = {**os.environ, "HPA_CACHE_DIR": str(tmp_path / "cache")}
    procs = {name: subprocess.Popen([str(script), name, "--help"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in COMMANDS}
    procs["python -m predict"] = subprocess.Popen([sys.executable, "-m", "hpa_lightning.predict", "--help"],
                                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  text=True)
    failures = []
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or len(out.strip().splitlines()) < 3 or "Traceback" in err:
            failures.append(f"{name}: exit {proc.returncode}: {(out + err).strip()[-300:]}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "cache").exists()  # help runs nothing
