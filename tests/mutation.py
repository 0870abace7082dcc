"""`make mutation`: mutation testing (mutmut) of the modules that compute metrics and losses and guard files.

    python -m tests.mutation                                   # the default modules, 2 workers
    python -m tests.mutation hpa_lightning/metrics.py --workers 1
    python -m tests.mutation --again                           # rerun the survivors of the last run (after new tests)

mutmut changes one operator, constant or string at a time ("mutant") and runs the tests that reach the changed
function; a mutant no test fails on ("survived") is a wrong number the suite would not notice. Each module is run
against its own fast tests (FAST_TESTS; a module not listed there gets the non-slow test files that import it), in a
scratch copy of the project under .cache/mutation (mutmut reads its settings from pyproject.toml, so the copy's gets a
[tool.mutmut] section naming the modules). Prints per module killed / survived / no tests and the score, killed /
(killed + survived + no tests): a timeout counts as killed, a function no test reaches counts against the score.
"other" (suspicious, segfault, not checked) stays out of the score. The survivors' diffs go to
.cache/mutation/survivors.txt; those judged equivalent (no test could tell them apart) are listed, with the reason,
at the top of each module's test file. OMP_NUM_THREADS=1: torch's OpenMP pool deadlocks in mutmut's forked workers
otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "mutation"
DEFAULT_MODULES = ("hpa_lightning/metrics.py", "hpa_lightning/models/losses.py", "hpa_lightning/data/split.py",
                   "hpa_lightning/targets.py")
# The unit tests of each module: fast, in-process (a test that only starts subprocesses reaches no mutant).
FAST_TESTS = {
    "hpa_lightning/metrics.py": ["tests/test_metrics.py"],
    "hpa_lightning/models/losses.py": ["tests/models/test_losses.py", "tests/models/test_lovasz.py"],
    "hpa_lightning/data/split.py": ["tests/data/test_split.py", "tests/data/test_folds.py", "tests/data/test_pack.py"],
    "hpa_lightning/targets.py": ["tests/test_targets.py"],
}
PYTEST_ARGS = ["-p", "no:xdist", "-p", "no:cacheprovider", "-m", "not slow and not slurm"]
COPIED = ("hpa_lightning", "tests", "conf", "pyproject.toml")
# mutmut's exit codes (mutmut.stats.status_by_exit_code) folded into the columns printed.
KILLED, SURVIVED, NO_TESTS = "killed", "survived", "no tests"
STATUS = {1: KILLED, 3: KILLED, 36: KILLED, 24: KILLED, -24: KILLED, 152: KILLED, 255: KILLED, 0: SURVIVED,
          5: NO_TESTS, 33: NO_TESTS, None: "not checked"}


def tests_for(module: str) -> list[str]:
    if module in FAST_TESTS:
        return FAST_TESTS[module]
    dotted = module.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    return sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").rglob("test_*.py")
                  if "slurm" not in path.parts and dotted in path.read_text())


def mutmut_section(modules: list[str], tests: list[str]) -> str:
    settings = {"source_paths": ["hpa_lightning"], "only_mutate": modules, "also_copy": ["conf"],
                "pytest_add_cli_args": PYTEST_ARGS, "pytest_add_cli_args_test_selection": tests,
                "use_git_change_detection": False}
    return "\n[tool.mutmut]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())


def prepare(modules: list[str], tests: list[str]) -> None:
    """A fresh scratch copy of the project whose pyproject.toml names the modules and their tests."""
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, WORK / name, ignore=ignore)
        else:
            shutil.copy2(source, WORK / name)
    pyproject = WORK / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + mutmut_section(modules, tests))


def run_mutmut(workers: int, names: list[str]) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "PYTHONDONTWRITEBYTECODE": "1"}
    mutmut = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(mutmut), "run", "--max-children", str(workers), *names], cwd=WORK, env=env).returncode


def statuses(module: str) -> dict[str, str]:
    meta = json.loads((WORK / "mutants" / f"{module}.meta").read_text())
    return {name: STATUS.get(code, "suspicious") for name, code in meta["exit_code_by_key"].items()}


def table(modules: list[str]) -> tuple[str, list[str]]:
    rows = [f"{'module':<34} {'mutants':>7} {'killed':>7} {'survived':>8} {'no tests':>8} {'other':>5} {'score':>7}"]
    survivors = []
    for module in modules:
        counts = Counter(statuses(module).values())
        counted = counts[KILLED] + counts[SURVIVED] + counts[NO_TESTS]
        other = sum(counts.values()) - counted
        score = f"{100 * counts[KILLED] / counted:.1f}%" if counted else "n/a"
        rows.append(f"{module:<34} {sum(counts.values()):>7} {counts[KILLED]:>7} {counts[SURVIVED]:>8} "
                    f"{counts[NO_TESTS]:>8} {other:>5} {score:>7}")
        survivors += [name for name, status in statuses(module).items() if status != KILLED]
    return "\n".join(rows), survivors


SHOW = """import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
for module, name, status in json.load(sys.stdin):
    print(f"# {name}: {status}\\n{get_diff_for_mutant(name, path=module)}\\n")
"""


def write_survivors(modules: list[str]) -> Path:
    """Every mutant not killed, with its diff (one process: `mutmut show` per mutant takes a second each)."""
    listed = [(module, name, status) for module in modules for name, status in statuses(module).items()
              if status != KILLED]
    out = WORK / "survivors.txt"
    with out.open("w") as f:
        subprocess.run([sys.executable, "-c", SHOW], cwd=WORK, input=json.dumps(listed), text=True, stdout=f,
                       check=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", default=list(DEFAULT_MODULES), help="source files to mutate")
    parser.add_argument("--workers", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--again", action="store_true",
                        help="rerun the last run's survivors in its scratch copy, with the tests as they are now")
    args = parser.parse_args(argv)
    modules = [str(Path(m)) for m in args.modules]
    for module in modules:
        if not (REPO / module).is_file() or not re.fullmatch(r"hpa_lightning/[\w/]+\.py", module):
            parser.error(f"{module}: not a module of the package (hpa_lightning/...py)")
    started = time.perf_counter()
    if args.again:
        missing = [m for m in modules if not (WORK / "mutants" / f"{m}.meta").is_file()]
        if missing:
            parser.error(f"--again: {', '.join(missing)} not in the last run (.cache/mutation); run without --again")
        for name in COPIED[:3]:  # the code and tests as they are now: mutmut re-mutates the functions that changed
            shutil.copytree(REPO / name, WORK / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        rc = run_mutmut(args.workers, [])  # the mutants of changed functions, and the new tests' stats
        _, survivors = table(modules)
        rc = rc or (run_mutmut(args.workers, survivors) if survivors else 0)
    else:
        tests = sorted({test for module in modules for test in tests_for(module)})
        prepare(modules, tests)
        rc = run_mutmut(args.workers, [])
    text, survivors = table(modules)
    print(f"\nmutation testing ({args.workers} workers, {time.perf_counter() - started:.0f} s)\n{text}")
    if survivors:
        print(f"{len(survivors)} not killed; their diffs: {write_survivors(modules).relative_to(REPO)}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
