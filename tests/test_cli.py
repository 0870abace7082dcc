"""One exit-status convention for every entry point (hpa_lightning.cli): 2 for bad input or configuration, with an
`error:` line and no traceback; 130 for Ctrl-C and 143 for SIGTERM are checked on real trainings in
tests/training/test_resume.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

MISSING = "/nonexistent/hpa"
BAD_INPUT = {
    "pack root": ("hpa_lightning.pack", [f"root={MISSING}"]),
    "pack argument": ("hpa_lightning.pack", ["sise=512"]),
    "predict": ("hpa_lightning.predict", [f"ckpt={MISSING}", f"input={MISSING}"]),
    "predict argument": ("hpa_lightning.predict", ["tta=two"]),
    "export": ("hpa_lightning.export", [f"ckpt={MISSING}", "out=x"]),
    "explain": ("hpa_lightning.explain", [f"ckpt={MISSING}", f"input={MISSING}"]),
    "report": ("hpa_lightning.report", [MISSING]),
    "resume": ("hpa_lightning.resume", [MISSING]),
    "rerun_failed": ("hpa_lightning.rerun_failed", [MISSING]),
    "rerun_failed flag": ("hpa_lightning.rerun_failed", [".", "--dry-run"]),
    "report flag": ("hpa_lightning.report", [".", "--out", "x"]),
    "resume without folder": ("hpa_lightning.resume", ["trust=a.B"]),
    "synth": ("hpa_lightning.synth", ["n=ten"]),
    "bench": ("hpa_lightning.bench", ["sections=nope"]),
    "train override": ("hpa_lightning.train", ["trainer.no_such_key=1"]),
    "train thresholds": ("hpa_lightning.train", ["thresholds.strategy=best", "model.pretrained=false"]),
    "train crop": ("hpa_lightning.train", ["crop.size=4096", "model.pretrained=false"]),
    "train data": ("hpa_lightning.train", ["data=hpa", f"data.root={MISSING}", "model.pretrained=false"]),
    "train no data": ("hpa_lightning.train", ["data=hpa", "model.pretrained=false"]),
    "train stream": ("hpa_lightning.train", ["data=hpa", f"data.store={MISSING}", "model.pretrained=false"]),
    "baseline override": ("hpa_lightning.baseline", ["no_such_key=1"]),
    "lr_find override": ("hpa_lightning.lr_find", ["no_such_key=1"]),
}

# where the line itself matters: the README's streaming recipe gives data.store and no data.root (which it replaces)
MESSAGES = {"train no data": "error: data.root: not set; give data.root=DIR",
            "train stream": f"error: data.store={MISSING}: folder not found"}


def test_bad_input_exits_2_with_an_error_and_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "HPA_CACHE_DIR": str(tmp_path / "cache")}
    procs = {name: subprocess.Popen([sys.executable, "-m", module, *args, f"hydra.run.dir={tmp_path / 'run'}"]
                                    if module.endswith(("train", "baseline", "lr_find")) else
                                    [sys.executable, "-m", module, *args],
                                    cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (module, args) in BAD_INPUT.items()}
    failures = []
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        if proc.returncode != 2 or "Traceback" in stderr or not stderr.strip() or \
                not stderr.strip().splitlines()[-1].startswith(MESSAGES.get(name, "")):
            failures.append(f"{name}: exit {proc.returncode}: {stderr.strip()[-300:]}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "cache" / "stores").exists()  # nothing half-written
    assert REPO.is_dir()


def test_every_command_checks_its_command_line_before_importing_the_training_stack() -> None:
    """`--help`, a typo in a key or an override, or `resume=true` with nothing to resume, is answered at once: torch,
    Lightning, timm and W&B (~4-7 s to import on 2 cores) are imported only after the command line is accepted.
    Each command module is imported in turn, then run through its `python -m` entry (a package's __main__ included)
    with `--help`, so a failure names the first one that pulls the stack in, and how."""
    code = ("import contextlib, importlib, io, runpy, sys\n"
            "from hpa_lightning.commands import COMMANDS\n"
            "def check(what):\n"
            "    heavy = sorted({'torch', 'lightning', 'timm', 'wandb'} & set(sys.modules))\n"
            "    if heavy:\n"
            "        sys.exit(f'{what} imports {heavy}')\n"
            "for module in COMMANDS.values():\n"
            "    importlib.import_module(module)\n"
            "    check(module)\n"
            "    sys.argv = [module, '--help']\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
            "    check(f'python -m {module} --help')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_one_parser_for_folders_own_keys_and_hydra_overrides() -> None:
    """report, resume and rerun_failed take their folder(s), their own keys and, for the jobs they relaunch, Hydra
    overrides through the one key=value parser of every command that does not compose conf/."""
    import pytest

    from hpa_lightning.cli import parse_key_values
    from hpa_lightning.errors import UsageError

    own = {"jobs": 1, "dry_run": False, "trust": ""}
    args = parse_key_values(["sweep", "jobs=4", "optimizer.lr=0.1", "dry_run=true", "+extra=1", "~callbacks.lr",
                             "trust=a.B"], own, "rerun_failed", positional="sweep_dir", overrides=True)
    assert args == {"jobs": 4, "dry_run": True, "trust": "a.B", "sweep_dir": "sweep",
                    "overrides": ["optimizer.lr=0.1", "+extra=1", "~callbacks.lr"]}
    assert parse_key_values(["a", "b", "out=r"], {"out": None}, "report", positional="folders", many=True) == {
        "out": "r", "folders": ["a", "b"]}
    for argv, message in ((["a", "b"], "unknown argument 'b'"), (["jobs=4"], "SWEEP_DIR missing"),
                          (["a", "--dry-run"], "write dry_run=true"), (["a", "jobs=four"], "not a valid int")):
        with pytest.raises(UsageError, match=message):
            parse_key_values(argv, own, "rerun_failed", positional="sweep_dir")
    with pytest.raises(UsageError, match="unknown argument 'optimizer.lr=0.1'"):  # no overrides: not passed on
        parse_key_values(["a", "optimizer.lr=0.1"], own, "rerun_failed", positional="sweep_dir")
