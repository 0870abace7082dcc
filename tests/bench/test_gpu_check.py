"""The GPU check: fails loudly without a CUDA device (never skips), keeps what it measured as it goes, fits one
deadline, lets each part fail alone, and runs whole on the CPU as a rehearsal (the lent machine is no place to find
a broken check)."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path

import pytest

from hpa_lightning.bench.acceptance import GPU, REHEARSAL, grow_batch, measure, plan, run_check, summary
from hpa_lightning.bench.check_runner import CheckReport, Deadline
from tests.conftest import REPO, compose_config

DEVICE_FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back from $OUT


def test_gpu_check_without_cuda_is_one_error_line_and_exit_1(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_ARGS": f"out={tmp_path / 'check'}"}
    # -o: use the installed environment as it is (the test suite runs inside it); PY: the interpreter running it
    proc = subprocess.run(["make", "-s", "-o", ".venv/.installed-stamp", "gpu-check", f"PY={sys.executable}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith("error: gpu-check needs a CUDA GPU and torch"), proc.stderr[-2000:]
    assert "rehearse=true" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "check").exists()  # refused before anything was written


@pytest.mark.parametrize("settings", [GPU, REHEARSAL], ids=["gpu", "rehearsal"])
def test_the_planned_train_and_sweep_commands_compose(tmp_path: Path, settings) -> None:
    commands = plan(tmp_path, settings)
    for name in ("train", "sweep"):
        overrides = [arg.split(",")[0] for arg in commands[name][1:] if arg != "-m"]  # one value of each sweep
        cfg = compose_config(overrides)
        assert cfg.data.image_size == settings.image_size and cfg.experiment_name == "focal_g02"
        if settings is GPU:
            assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
            assert cfg.trainer.benchmark == "auto" and cfg.model.name == "resnet50"  # auto: on, on a GPU
    sweep = compose_config([a for a in commands["sweep"][1:] if a != "-m" and "," not in a])
    assert sweep.hydra.launcher and sweep.data.max_samples == settings.sweep_samples
    assert "tta=8" in commands["predict"]


def report_in(folder: Path, budget_s: float = 100.0, clock=time.monotonic) -> CheckReport:
    return CheckReport(folder, {"gpu": "test", "gpus": 0, "torch": "-", "cuda": None, "date": "-",
                                "budget_s": budget_s}, summary, Deadline(budget_s, clock))


def saved(folder: Path) -> dict:
    return json.loads((folder / "gpu_check.json").read_text())


def test_batch_sizes_grow_until_memory_runs_out_each_saved_as_it_goes(tmp_path: Path) -> None:
    report = report_in(tmp_path)
    seen_on_disk = []

    def run_one(batch: int) -> dict:
        seen_on_disk.append(sorted(saved(tmp_path)["parts"]["bench"]["sizes"]))  # what a kill would leave
        if batch == 4:
            raise ValueError("a bug at this size only")
        if batch == 16:  # cuBLAS's allocation failure arrives as a plain RuntimeError
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return {"images_per_s": 100.0 * batch, "step_ms": 1.0, "peak_memory_gib": 0.5 * batch}

    settings = replace(REHEARSAL, first_batch=2, max_batch=64)
    record = grow_batch(run_one, settings, report, reserve_s=0.0, capacity_gib=100.0)
    sizes = record["sizes"]
    assert list(sizes) == ["eager_b2", "eager_b4", "eager_b8", "eager_b16"]
    assert sizes["eager_b4"]["status"] == "failed" and "a bug at this size" in sizes["eager_b4"]["error"]
    assert not sizes["eager_b4"]["out_of_memory"]  # recorded, and the next size still ran
    assert sizes["eager_b16"]["out_of_memory"] and record["stopped"] == "out of memory at batch 16"
    assert record["best_batch"] == 8
    assert seen_on_disk == [[], ["eager_b2"], ["eager_b2", "eager_b4"], ["eager_b2", "eager_b4", "eager_b8"]]
    assert saved(tmp_path)["parts"]["bench"]["best_batch"] == 8


def test_batch_sizes_stop_where_images_per_s_or_memory_stop_growing(tmp_path: Path) -> None:
    flat = {2: 100.0, 4: 180.0, 8: 182.0, 16: 400.0}
    record = grow_batch(lambda b: {"images_per_s": flat[b]}, replace(REHEARSAL, max_batch=64), report_in(tmp_path),
                        0.0, None)
    assert list(record["sizes"]) == ["eager_b2", "eager_b4", "eager_b8"] and record["best_batch"] == 4
    assert record["stopped"] == "images/s stopped growing at batch 8"
    # peak memory 10 GiB + 10 GiB per doubling: batch 16 would need ~40 GiB of a 39 GiB device
    record = grow_batch(lambda b: {"images_per_s": 10.0 * b, "peak_memory_gib": 10.0 + 10.0 * (b // 4)},
                        replace(REHEARSAL, max_batch=64), report_in(tmp_path / "memory"), 0.0, 39.0)
    assert record["best_batch"] == 8 and record["stopped"].startswith("batch 16 would need ~40 GiB of 39")


def test_a_size_that_does_not_fit_the_deadline_is_skipped(tmp_path: Path) -> None:
    now = [0.0]
    report = report_in(tmp_path, budget_s=9.0, clock=lambda: now[0])

    def run_one(batch: int) -> dict:
        now[0] += 4.0  # each size takes 4 s: the next one is estimated at 6 s, and 5 s are left
        return {"images_per_s": 10.0 * batch}

    record = grow_batch(run_one, replace(REHEARSAL, max_batch=64), report, reserve_s=0.0, capacity_gib=None)
    assert [r["status"] for r in record["sizes"].values()] == ["ok", "skipped"] and record["stopped"] == "deadline"


def test_a_failed_size_frees_its_memory_outside_the_except(tmp_path: Path) -> None:
    """What a failed size held (a module and trainer in a reference cycle, referenced by the traceback's frames) is
    gone when measure() returns: the traceback is dropped before gc runs."""
    class Held:
        pass

    alive = []

    def run_one(batch: int) -> dict:
        held = Held()
        held.cycle = held  # Lightning's module <-> trainer
        alive.append(weakref.ref(held))
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    gc.disable()  # only the explicit collection in measure() may free it
    try:
        record = measure(run_one, 8, "cpu")
        assert alive[0]() is None
    finally:
        gc.enable()
    assert record["status"] == "failed" and record["out_of_memory"]


def test_a_part_fails_or_times_out_alone(tmp_path: Path) -> None:
    report = report_in(tmp_path)
    failed = report.run("train", [sys.executable, "-c", "print('step 1'); raise SystemExit(3)"], dict(os.environ), 60)
    assert failed["status"] == "failed" and failed["exit"] == 3 and failed["log_tail"] == ["step 1"]
    started = time.monotonic()
    late = report.run("sweep", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), 1.0)
    assert late["status"] == "timeout" and time.monotonic() - started < 30
    parts = saved(tmp_path)["parts"]
    assert parts["train"]["status"] == "failed" and parts["sweep"]["status"] == "timeout"
    assert (tmp_path / "train.log").read_text() == "step 1\n"


SIGTERM_SCRIPT = """
import os, sys, time
from pathlib import Path
from hpa_lightning.bench.check_runner import CheckReport, Deadline
report = CheckReport(Path(sys.argv[1]), {"budget_s": 60}, lambda data: "summary", Deadline(60))
with report.saved_on_sigterm():
    report.part("bench", status="ok", sizes={"eager_b32": {"status": "ok"}})
    report.run("train", [sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ), 100)
"""


def test_sigterm_writes_what_exists_and_stops_the_running_part(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        parts = saved(tmp_path)["parts"] if (tmp_path / "gpu_check.json").is_file() else {}
        if parts.get("train", {}).get("pid"):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    report = saved(tmp_path)
    assert report["state"] == "interrupted (SIGTERM)" and report["ok"] is False
    assert report["parts"]["bench"]["sizes"] == {"eager_b32": {"status": "ok"}}
    assert report["parts"]["train"]["status"] == "interrupted"
    with pytest.raises(ProcessLookupError):  # the running part was ended (and reaped) before the exit
        os.kill(report["parts"]["train"]["pid"], 0)


def test_parts_that_do_not_fit_the_budget_are_skipped(tmp_path: Path) -> None:
    """The real sequence with no time left: every part is recorded as skipped (predict because train did not run),
    and the report says so."""
    report = run_check(tmp_path / "out", tmp_path / "report", 1, replace(REHEARSAL, budget_s=0.01))
    parts = report["parts"]
    assert parts["bench"]["status"] == "failed" and parts["bench"]["sizes"]["eager_b2"]["status"] == "skipped"
    assert [parts[p]["status"] for p in ("train", "predict", "sweep", "compiled")] == ["skipped"] * 4
    assert "train did not succeed" in parts["predict"]["error"]
    assert report["ok"] is False and report["state"] == "finished"
    assert "skipped" in (tmp_path / "report" / "summary.txt").read_text()


@pytest.mark.e2e
def test_the_rehearsal_runs_every_part_on_the_cpu_and_resolves_the_bundle(tmp_path: Path) -> None:
    """`python -m hpa_lightning.gpu_check rehearse=true`: the lent machine's sequence on the CPU at tiny sizes, the
    import tracer in every process; the report folder is what the device tool brings back."""
    out, report_dir = tmp_path / "out", tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "hpa_lightning.gpu_check", "rehearse=true", f"out={out}",
                           f"report={report_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    report = json.loads((report_dir / "gpu_check.json").read_text())
    assert proc.returncode == 0, (summary(report), proc.stdout[-3000:], proc.stderr[-3000:])
    assert report["ok"] and report["state"] == "finished" and report["rehearsal"]
    parts = report["parts"]
    assert [parts[p]["status"] for p in ("bench", "train", "predict", "sweep", "compiled", "bundle")] == ["ok"] * 6
    for run in [*(s for s in parts["bench"]["sizes"].values() if s["status"] == "ok"), parts["compiled"]]:
        assert len(run["windows"]) == REHEARSAL.windows.count and run["timed_steps"] >= 2 * REHEARSAL.windows.min_steps
        assert run["step_ms_min"] <= run["step_ms"] <= run["step_ms_max"] and run["cudnn_benchmark"]
        assert run["epoch_restarts_timed"] == 0 and run["host_reads_per_step"] >= 0
    assert parts["compiled"]["compiled"] and parts["compiled"]["batch"] == parts["bench"]["best_batch"]
    assert parts["sweep"]["jobs_completed"] == 2
    # what comes back from $OUT: at most 8 plain files, no folders, plain names, no data
    files = sorted(p.name for p in report_dir.iterdir())
    assert len(files) <= 8 and all(DEVICE_FILE_NAME.match(f) for f in files), files
    assert all((report_dir / f).is_file() and (report_dir / f).stat().st_size < 2**20 for f in files)
    assert {"gpu_check.json", "summary.txt", "check.log", "train.log", "compiled.log"} <= set(files)
    assert (report_dir / "summary.txt").read_text().startswith("gpu-check on CPU (rehearsal)")
    # the bundle: what the check imports beyond the image, read off its processes (no download here)
    resolution = parts["bundle"]["resolution"]
    needed = set(resolution["needed"])
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "kornia", "hydra-joblib-launcher"} <= needed
    assert not needed & {"torch", "lightning", "timm", "numpy", "hpa-lightning", "wandb"}
    assert "wandb" in resolution["hidden"]  # timm's optional import: absent there, hidden here
    assert resolution["processes"] >= 5  # the check, its parts, the synthetic generator's workers
