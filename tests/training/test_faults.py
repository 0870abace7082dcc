"""Preempted at any moment, resumed to the same run: a signal (SIGTERM as a scheduler sends it, SIGKILL as a dying node)
at each point of a real training job, then `resume` (or `resume=auto`, as a requeued job), must end with the weights,
best.ckpt, metrics.csv, results.json and predictions of the uninterrupted run, bit for bit (CPU, data workers on).

The whole matrix (the issue's own case, SIGTERM at step 18 of 36, a full disk, a kill while a checkpoint is written, an
unreadable last.ckpt, every point x TERM/KILL, other samplers, DDP) is marked `faults` (`make test-faults`, run by CI);
in `make test`, tests/training/test_resume.py stops runs mid-epoch (SIGTERM, submitit's requeue) and resumes them, and
tests/training/test_checkpoint_io.py and tests/test_files.py check the writers, the full disk and the fallback
without training.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import REPO, built_once, run_train
from tests.training.test_resume import resume_without_fault

pytestmark = pytest.mark.slow
# the run: 3 epochs of 12 steps, data read by 2 threads
RUN = ["+experiment=focal_g02", "+preset=tiny", "trainer.max_epochs=3", "data.num_workers=2"]
# the matrix's: the same with evaluation batches of 8, so that validation and test have 3 batches to stop between
MATRIX = [*RUN, "data.eval_batch_size=8"]
FAULT = "+callbacks.fault._target_=tests.training.faults.SignalAt"


def checkpoint_state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Everything of a checkpoint that training changes: weights, the live weights under weight averaging, the
    optimizer's state (momentum buffers)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    tensors = {"state_dict": saved["state_dict"], "current_model_state": saved.get("current_model_state") or {}}
    tensors["optimizer"] = {f"{i}.{param}.{name}": value for i, optimizer in enumerate(saved["optimizer_states"])
                            for param, state in optimizer["state"].items() for name, value in state.items()
                            if isinstance(value, torch.Tensor)}
    return tensors


def assert_same_run(reference: Path, run: Path) -> None:
    for name in ("last.ckpt", "best.ckpt"):
        expected, got = checkpoint_state(reference / "checkpoints" / name), checkpoint_state(run / "checkpoints" / name)
        for part in expected:
            assert expected[part].keys() == got[part].keys(), (name, part)
            for key, value in expected[part].items():
                assert torch.equal(value, got[part][key]), f"{name} {part} {key}: max abs difference " \
                    f"{(value.double() - got[part][key].double()).abs().max():.3g}"
    results = [json.loads((folder / "results.json").read_text()) for folder in (reference, run)]
    for key in ("val", "test", "thresholds", "epochs", "best_checkpoint"):
        expected, got = results[0][key], results[1][key]
        if key == "best_checkpoint":
            expected, got = Path(expected).name, Path(got).name
        assert expected == got, key
    for name in ("test_predictions.csv", "val_predictions.csv", "lr_trace.csv", "thresholds.json"):
        assert (reference / name).read_text() == (run / name).read_text(), name
    pd.testing.assert_frame_equal(pd.read_csv(reference / "metrics.csv"), pd.read_csv(run / "metrics.csv"))
    assert not list((run / "checkpoints").glob("*.tmp-*")), "a checkpoint temporary was left behind"


def straight_run(folder: Path, cache: Path, args: list[str]) -> Path:
    proc = run_train([*args, f"hydra.run.dir={folder}"], cache, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def interrupt(folder: Path, cache: Path, args: list[str], fault: list[str]) -> subprocess.CompletedProcess:
    return run_train([*args, f"hydra.run.dir={folder}", *fault], cache, REPO)


def requeue(folder: Path, cache: Path, args: list[str]) -> subprocess.CompletedProcess:
    """What a requeued cluster job runs: the same command, in the same folder, with resume=auto."""
    return run_train([*args, f"hydra.run.dir={folder}", "resume=auto"], cache, REPO)


@pytest.fixture(scope="module")
def reference(shared_cache: Path) -> Path:
    return built_once(shared_cache, "faults-reference", lambda folder: straight_run(folder / "run", shared_cache,
                                                                                     RUN)) / "run"


@pytest.fixture(scope="module")
def matrix_reference(shared_cache: Path) -> Path:
    return built_once(shared_cache, "faults-matrix-reference",
                      lambda folder: straight_run(folder / "run", shared_cache, MATRIX)) / "run"


@pytest.mark.faults
def test_sigterm_mid_epoch_then_resume_is_the_uninterrupted_run(reference: Path, tmp_path: Path,
                                                                shared_cache: Path) -> None:
    """The issue's case: SIGTERM at global step 18 of 36 (epoch 1, batch 6 of 12), then `resume`."""
    run = tmp_path / "preempted"
    proc = interrupt(run, shared_cache, RUN, [FAULT, "+callbacks.fault.step=18"])
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "interrupted at epoch 1, step 18" in proc.stdout
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 18
    [loader] = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (loader["delivered"], loader["batches"]) == (6, 12)
    proc = resume_without_fault(run, shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference, run)


@pytest.mark.faults
def test_kill_while_a_checkpoint_is_written_leaves_the_previous_one_and_resumes(reference: Path, tmp_path: Path,
                                                                                 shared_cache: Path) -> None:
    """SIGKILL halfway through writing the run's 3rd checkpoint (epoch 1's): epoch 0's checkpoints stay whole under
    their names, the half-written bytes only in a temporary, and `resume=auto` continues from epoch 0."""
    run = tmp_path / "killed"
    plugin = "trainer.plugins=[{_target_:tests.training.faults.SignalDuringCheckpointWrite,sig:KILL,nth:3}]"
    proc = interrupt(run, shared_cache, RUN, [plugin])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    temporaries = list((run / "checkpoints").glob("*.tmp-*"))
    assert len(temporaries) == 1 and temporaries[0].stat().st_size < (run / "checkpoints" / "last.ckpt").stat().st_size
    for name in ("best.ckpt", "last.ckpt"):
        assert torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)["epoch"] == 0
    proc = requeue(run, shared_cache, RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference, run)


@pytest.mark.faults
def test_unreadable_last_checkpoint_falls_back_to_the_newest_readable_one(reference: Path, tmp_path: Path,
                                                                          shared_cache: Path) -> None:
    """A last.ckpt truncated by something outside the project (a copy, a filesystem) is one line naming it; the resume
    goes on from the newest readable checkpoint, says which, and still ends as the uninterrupted run."""
    run = tmp_path / "truncated"
    proc = interrupt(run, shared_cache, RUN, [FAULT, "+callbacks.fault.step=30", "+callbacks.fault.sig=KILL"])
    assert proc.returncode == -signal.SIGKILL
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1
    with last.open("r+b") as handle:
        handle.truncate(last.stat().st_size // 3)
    proc = resume_without_fault(run, shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "resume: " in line]
    assert len(warnings) == 2, warnings
    assert f"{last}: not a readable checkpoint" in warnings[0]
    assert f"continuing from {run / 'checkpoints' / 'best.ckpt'} (epoch 0, step 12)" in warnings[1]
    assert_same_run(reference, run)


def limit_file_size(size: int):
    """A preexec function: the process's files may grow to `size` bytes only, with SIGXFSZ ignored, so that a write
    beyond fails with EFBIG as it would on a full disk or over a quota."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return apply


@pytest.mark.faults
def test_full_disk_while_writing_a_checkpoint_stops_with_one_line_and_resumes(reference: Path, tmp_path: Path,
                                                                               shared_cache: Path) -> None:
    """A small filesystem (tmpfs, mounted by the test) with room for epoch 0's two checkpoints and not for epoch 1's:
    the run stops with one line naming the checkpoint and the space it needs, exit 2, epoch 0's checkpoints intact;
    given the space, `resume` ends as the uninterrupted run. Without the right to mount, a file-size limit (EFBIG, as
    a quota) stands in for the full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size = (reference / "checkpoints" / "last.ckpt").stat().st_size
    # room for the start-up check (two checkpoints and 50 MiB) and epoch 0's two checkpoints, not for a third
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(2.75 * size)}", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    try:
        run = disk / "run"
        args = [*RUN, f"hydra.run.dir={run}"]
        if mounted:
            proc = run_train(args, shared_cache, REPO)
        else:
            env = {**os.environ, "HPA_CACHE_DIR": str(shared_cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
            proc = subprocess.run([sys.executable, "-m", "hpa_lightning.train", *args], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size(size - 1))
        assert proc.returncode == 2, proc.stderr[-3000:]
        last_line = proc.stderr.strip().splitlines()[-1]
        assert last_line.startswith(f"error: {run / 'checkpoints'}/") and "no space left to write it" in last_line
        needed = float(re.search(r"needs ([0-9.]+) MiB", last_line).group(1))
        assert abs(needed - size / 2**20) < 0.1, (needed, size)  # a checkpoint's size, as the reference's
        assert not list((run / "checkpoints").glob("*.tmp-*")), "the failed write's temporary was left behind"
        if not mounted:
            return  # every checkpoint is over the limit: nothing to resume; the mounted disk checks the rest
        kept = {path.name: torch.load(path, map_location="cpu", weights_only=True)["epoch"]
                for path in (run / "checkpoints").glob("*.ckpt")}
        assert kept and set(kept.values()) == {0}, kept
        subprocess.run(["mount", "-o", f"remount,size={6 * size}", str(disk)], check=True)
        proc = resume_without_fault(run, shared_cache)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same_run(reference, run)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)


# ---- the rest of the matrix: `make test-faults` ---------------------------------------------------------------------
POINTS = {
    "train": ["+callbacks.fault.at=train", "+callbacks.fault.step=18"],
    "validation": ["+callbacks.fault.at=validation", "+callbacks.fault.epoch=1"],
    "before_checkpoints": ["+callbacks.fault.at=before_checkpoints", "+callbacks.fault.epoch=1"],
    "test": ["+callbacks.fault.at=test"],
    "outputs": ["+callbacks.fault.at=outputs"],
}


@pytest.mark.faults
@pytest.mark.parametrize("sig", ["TERM", "KILL"])
@pytest.mark.parametrize("point", [*POINTS, "checkpoint_write"])
def test_fault_matrix(point: str, sig: str, matrix_reference: Path, tmp_path: Path, shared_cache: Path) -> None:
    run = tmp_path / "run"
    if point == "checkpoint_write":  # epoch 1's best.ckpt, the run's 3rd checkpoint
        fault = [f"trainer.plugins=[{{_target_:tests.training.faults.SignalDuringCheckpointWrite,sig:{sig},nth:3}}]"]
    else:
        fault = [FAULT, f"+callbacks.fault.sig={sig}", *POINTS[point]]
    proc = interrupt(run, shared_cache, MATRIX, fault)
    expected = {"TERM": (143, -signal.SIGTERM), "KILL": (-signal.SIGKILL,)}[sig]  # TERM while writing outputs: default
    assert proc.returncode in expected, (proc.returncode, proc.stderr[-2000:])
    assert not (run / "results.json").exists()
    # KILL cells come back as a requeued job does, TERM cells by the command the run printed
    proc = requeue(run, shared_cache, MATRIX) if sig == "KILL" else resume_without_fault(run, shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(matrix_reference, run)
    # requeued once more after it completed: the run is left as it was, and the job says so
    outputs = [run / name for name in ("results.json", "metrics.csv", "test_predictions.csv")]
    outputs += sorted((run / "checkpoints").iterdir())
    before = [path.stat().st_mtime_ns for path in outputs]
    proc = requeue(run, shared_cache, MATRIX)
    assert proc.returncode == 0 and "already complete" in proc.stdout
    assert [path.stat().st_mtime_ns for path in outputs] == before


RECIPES = {
    # the samplers, splits, crops and weight averaging that change what an epoch draws and what a checkpoint holds
    "oversample_fold_crop_ema": ["data.oversample=true", "data.split.folds=3", "data.split.fold=1", "crop.size=24",
                                 "callbacks=ema", "callbacks.weight_averaging.decay=0.9"],
    "swa_process_workers": ["callbacks=swa", "data.worker_type=process", "data.persistent_workers=true"],
}


@pytest.mark.faults
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_sigterm_mid_epoch_with_other_samplers_and_weight_averaging(recipe: str, tmp_path: Path,
                                                                    shared_cache: Path) -> None:
    args = [*RUN, *RECIPES[recipe]]
    straight = straight_run(tmp_path / "straight", shared_cache, args)
    run = tmp_path / "preempted"
    proc = interrupt(run, shared_cache, args, [FAULT, "+callbacks.fault.step=18"])
    assert proc.returncode == 143, proc.stderr[-2000:]
    proc = resume_without_fault(run, shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(straight, run)


DDP = ["+experiment=focal_g02", "+preset=tiny", "trainer=ddp_cpu", "trainer.max_epochs=3", "data.synthetic.n=150",
       "data.image_size=24", "data.eval_batch_size=7", "data.num_workers=2"]


@pytest.mark.faults
def test_ddp_sigterm_to_one_rank_mid_epoch_then_resume_is_the_uninterrupted_run(tmp_path: Path,
                                                                                shared_cache: Path) -> None:
    """Two CPU ranks; SIGTERM to rank 1 only (one node of a job preempted) at step 7 of 9: every rank stops at the
    same step, rank 0 saves last.ckpt mid-epoch, and the resumed run (each rank its own shard) ends as the
    uninterrupted one. Lightning's own handler aborted gloo here ("collective mismatch")."""
    straight = straight_run(tmp_path / "straight", shared_cache, DDP)
    run = tmp_path / "preempted"
    proc = interrupt(run, shared_cache, DDP, [FAULT, "+callbacks.fault.step=7", "+callbacks.fault.rank=1"])
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "interrupted at epoch 2, step 8" in proc.stdout
    proc = resume_without_fault(run, shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(straight, run)
