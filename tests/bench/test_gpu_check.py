"""`make gpu-check` fails loudly without a CUDA device (never skips), and the steps it would run are valid commands."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from hpa_lightning.bench.gpu_check import plan
from tests.conftest import REPO, compose_config


def test_gpu_check_without_cuda_is_one_error_line_and_exit_1(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_ARGS": f"out={tmp_path / 'check'}"}
    # -o: use the installed environment as it is (the test suite runs inside it)
    proc = subprocess.run(["make", "-s", "-o", ".venv/.installed-stamp", "gpu-check"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith("error: gpu-check needs a CUDA GPU and torch"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "check").exists()  # refused before anything was written


def test_the_planned_train_and_sweep_commands_compose(tmp_path: Path) -> None:
    commands = plan(tmp_path)
    for name in ("train", "sweep"):
        overrides = [arg.split(",")[0] for arg in commands[name][1:] if arg != "-m"]  # one value of each sweep
        cfg = compose_config(overrides)
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.data.image_size == 512 and cfg.experiment_name == "focal_g02"
    assert compose_config([a for a in commands["sweep"][1:] if a != "-m" and "," not in a]).hydra.launcher
    assert "tta=8" in commands["predict"]
