"""Resume without loss, survive interruption, determinism, non-finite losses: real training subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import REPO, assert_no_duplicate_steps, run_train

pytestmark = pytest.mark.slow
TINY = ["+experiment=focal_g02", "+preset=tiny", "data.synthetic.n=120", "data.image_size=24"]


def net_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = net_weights(a), net_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


def resume(run_dir: Path, cache: Path, extra: list[str] | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HPA_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "hpa_lightning.resume", str(run_dir), *(extra or [])], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def resume_without_fault(run_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    """`resume` of a run stopped by a fault callback, which is one of its overrides: dropped for the resumed part."""
    overrides = run_dir / ".hydra" / "overrides.yaml"
    overrides.write_text("\n".join(line for line in overrides.read_text().splitlines() if "fault" not in line))
    return resume(run_dir, cache)


def test_same_seed_same_weights_and_metrics_with_workers(tmp_path: Path, shared_cache: Path) -> None:
    runs = []
    for name in ("a", "b"):
        proc = run_train([*TINY, "data.num_workers=2", f"hydra.run.dir={tmp_path / name}"], shared_cache, REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(tmp_path / name)
    assert_same_weights(runs[0] / "checkpoints" / "last.ckpt", runs[1] / "checkpoints" / "last.ckpt")
    results = [json.loads((r / "results.json").read_text()) for r in runs]
    assert results[0]["test"] == results[1]["test"] and results[0]["val"] == results[1]["val"]


def test_ctrl_c_at_the_best_epochs_end_then_resume_equals_an_uninterrupted_run(tmp_path: Path,
                                                                              shared_cache: Path) -> None:
    straight = tmp_path / "straight"
    proc = run_train([*TINY, "trainer.max_epochs=3", f"hydra.run.dir={straight}"], shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    best_epoch = torch.load(straight / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["epoch"]

    # Ctrl-C after that epoch's validation, before Lightning's checkpoint callbacks (which it runs last)
    broken = tmp_path / "broken"
    proc = run_train([*TINY, "trainer.max_epochs=3", f"hydra.run.dir={broken}",
                      "+callbacks.fault._target_=tests.training.faults.InterruptAfterEpoch",
                      f"+callbacks.fault.epoch={best_epoch}"], shared_cache, REPO)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    assert f"resume with: python -m hpa_lightning.resume {broken}" in proc.stdout
    assert (broken / "checkpoints" / "last.ckpt").is_file() and not (broken / "results.json").exists()

    proc = resume_without_fault(broken, shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((broken / "results.json").read_text())
    assert results["epochs"] == 3
    assert_same_weights(straight / "checkpoints" / "last.ckpt", broken / "checkpoints" / "last.ckpt")
    assert_same_weights(straight / "checkpoints" / "best.ckpt", broken / "checkpoints" / "best.ckpt")
    expected = json.loads((straight / "results.json").read_text())
    assert results["test"] == expected["test"] and results["val"] == expected["val"]
    pd.testing.assert_frame_equal(pd.read_csv(broken / "test_predictions.csv"),
                                  pd.read_csv(straight / "test_predictions.csv"))
    trace = pd.read_csv(broken / "lr_trace.csv")
    assert trace["step"].tolist() == list(range(len(trace))) and trace["epoch"].max() == 2
    metrics = pd.read_csv(broken / "metrics.csv")
    assert set(metrics.dropna(subset=["val/macro_f1"])["epoch"]) >= {0, 1, 2}  # epochs before and after the stop

    # a requeued job that had already finished: resume=auto says so and exits 0, leaving the run as it is
    finished = (broken / "results.json").stat().st_mtime_ns
    proc = run_train([*TINY, "trainer.max_epochs=3", f"hydra.run.dir={broken}", "resume=auto"], shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already complete" in proc.stdout
    assert (broken / "results.json").stat().st_mtime_ns == finished
    assert json.loads((broken / "status.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(("fault", "exit_code"), [("SigtermAtStep", 143), ("SubmititTimeoutAtStep", 255)])
def test_stop_mid_epoch_saves_and_resumes_without_duplicate_steps(tmp_path: Path, shared_cache: Path, fault: str,
                                                                  exit_code: int) -> None:
    """SIGTERM (a preemption) and submitit's SIGUSR2 requeue (sys.exit from its handler, 120 s before the time
    limit) both save last.ckpt mid-epoch; the resumed run ends with the configured epochs and logs no step twice."""
    run_dir = tmp_path / "preempted"
    proc = run_train([*TINY, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}",
                      f"+callbacks.fault._target_=tests.training.faults.{fault}", "+callbacks.fault.step=2"],
                     shared_cache, REPO)
    assert proc.returncode == exit_code, (proc.returncode, proc.stderr[-2000:])
    assert "resume with: python -m hpa_lightning.resume" in proc.stdout
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 2 <= saved["global_step"] <= 3
    proc = resume_without_fault(run_dir, shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 2
    # both attempts are accounted for, not only the last one
    first, second = results["attempts"]
    assert first["outcome"].startswith("stopped") and "fit_s" not in first and first["wall_s"] > 0
    assert second["outcome"] == "completed" and second["resumed_from"].endswith("last.ckpt")
    assert second["fit_s"] == results["timings_s"]["fit_s"]
    assert results["total_wall_time_s"] == pytest.approx(first["wall_s"] + second["wall_s"], abs=0.02)
    assert_no_duplicate_steps(run_dir)


def test_resume_with_nothing_to_resume_is_an_error(tmp_path: Path, shared_cache: Path) -> None:
    proc = run_train([*TINY, f"hydra.run.dir={tmp_path / 'fresh'}", "resume=true"], shared_cache, REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: resume=true: nothing to resume in")
    assert not (tmp_path / "fresh" / "checkpoints").exists()


def test_missing_ckpt_path_is_an_error(tmp_path: Path, shared_cache: Path) -> None:
    proc = run_train([*TINY, f"hydra.run.dir={tmp_path / 'x'}", f"ckpt_path={tmp_path / 'none.ckpt'}"],
                     shared_cache, REPO)
    assert proc.returncode == 2 and "none.ckpt: file not found" in proc.stderr


def test_non_finite_loss_stops_with_epoch_and_step_and_no_bad_checkpoint(tmp_path: Path, shared_cache: Path) -> None:
    run_dir = tmp_path / "nan"
    proc = run_train([*TINY, f"hydra.run.dir={run_dir}",
                      "+callbacks.fault._target_=tests.training.faults.PoisonWeightsAtStep",
                      "+callbacks.fault.step=2"], shared_cache, REPO)
    assert proc.returncode == 2
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "non-finite" in last_line and "epoch 0" in last_line and "step 2" in last_line
    for checkpoint in (run_dir / "checkpoints").glob("*.ckpt") if (run_dir / "checkpoints").exists() else []:
        assert all(torch.isfinite(v).all() for v in net_weights(checkpoint).values() if v.is_floating_point())
    assert not (run_dir / "results.json").exists()


def test_full_disk_is_reported_before_training(tmp_path: Path, shared_cache: Path, monkeypatch) -> None:
    from hpa_lightning.errors import RunSetupError
    from hpa_lightning.training.checks import check_output_dir

    with pytest.raises(RunSetupError, match="MiB free on its disk"):
        check_output_dir(tmp_path / "out", need_bytes=2**62)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunSetupError, match="output folder is not writable"):
        check_output_dir(blocker / "sub", need_bytes=1)
