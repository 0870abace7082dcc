"""The suite's own set-up, run as `make test` runs it: what it costs when it silently breaks is minutes of CI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

MODULE = '''
import pytest

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    with open({log!r}, "a") as log:
        log.write("built\\n")

@pytest.mark.parametrize("case", range(6))
def test_uses_the_module_fixture(trained, case):
    pass

@pytest.mark.slow
def test_a_slow_one_of_the_same_module(trained):
    pass
'''


def make_test_workers() -> list[str]:
    """The Makefile's TEST_WORKERS, with two workers whatever this machine's cores."""
    line = re.search(r"^TEST_WORKERS \?= (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert line, "Makefile: TEST_WORKERS ?= ... not found"
    args = line.group(1).split()
    args[args.index("-n") + 1] = "2"
    return args


def test_a_module_scoped_fixture_is_built_once_under_the_suites_workers(tmp_path: Path) -> None:
    """The trainings and sweeps the suite's modules share (module-scoped fixtures, 10-30 s each) must be built once:
    every test of such a module has to land on one xdist worker, in one run of the module. With `--dist loadgroup`,
    pytest 9.2 ignores the group pytest-xdist 3.8 writes into a test's id, and the tests were dealt one by one, each
    worker building every fixture again (about a minute of `make test`; pytest-dev/pytest-xdist#1386, open)."""
    log = tmp_path / "built.log"
    (tmp_path / "test_shared.py").write_text(MODULE.format(log=str(log)))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")}  # a session anew
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           *make_test_workers(), str(tmp_path / "test_shared.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "7 passed" in proc.stdout
    assert log.read_text().splitlines() == ["built"]
