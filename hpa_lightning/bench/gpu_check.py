"""The one-call GPU acceptance check (`make gpu-check`, usage: hpa_lightning/gpu_check.py).

Steps, each timed and recorded, whatever the others did:
  bench     ResNet50 at 512 px, bf16-mixed, channels_last, fed by the real DataModule: eager at batch sizes 32, 64,
            128, 256 until one runs out of memory, then `model.compile` at the largest that fit: images/s, step
            time, the share of each step spent waiting for data, peak GPU memory
  train     `+experiment=focal_g02 trainer=gpu`, one epoch at 512 px on synthetic data (from scratch: no hub here)
  sweep     a two-job sweep (two learning rates) under `hydra/launcher=gpu_pool`, each job on a GPU of its own claim
  predict   the trained run with `tta=8` on held-out synthetic images
No CUDA device is an error, never a skip: the check exists to be run where one is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from hpa_lightning.files import write_json_atomic

BATCH_SIZES = (32, 64, 128, 256)
STEP_TIMEOUT_S = 420


class NoCudaError(RuntimeError):
    """gpu-check needs a CUDA device and there is none."""


def require_cuda() -> str:
    if not torch.cuda.is_available():
        raise NoCudaError(f"gpu-check needs a CUDA GPU and torch {torch.__version__} sees none (CUDA build "
                          f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return torch.cuda.get_device_name(0)


def plan(out: Path) -> dict[str, list[str]]:
    """The command lines of the train, sweep and predict steps (module arguments after `python -m`)."""
    synthetic = ["data.synthetic.n=1000", "data.synthetic.size=512", "data.synthetic.zoom=1.0", "data.image_size=512",
                 "model.pretrained=false", f"paths.cache_dir={out / 'cache'}"]
    return {
        "train": ["hpa_lightning.train", "+experiment=focal_g02", "trainer=gpu", "trainer.max_epochs=1",
                  "finetune.frozen_epochs=0", *synthetic, f"hydra.run.dir={out / 'train'}"],
        "sweep": ["hpa_lightning.train", "-m", "+experiment=focal_g02", "trainer=gpu", "trainer.max_epochs=1",
                  "hydra/launcher=gpu_pool", "optimizer.lr=0.01,0.02", *synthetic, "data.synthetic.n=400",
                  f"hydra.sweep.dir={out / 'sweep'}"],
        "predict": ["hpa_lightning.predict", f"ckpt={out / 'train'}", f"input={out / 'held_out'}", "tta=8",
                    f"out={out / 'predict' / 'submission.csv'}", "progress=false"],
    }


def _run_step(name: str, args: list[str], out: Path) -> dict:
    started = time.perf_counter()
    log = out / f"{name}.log"
    with log.open("w") as handle:
        try:
            code = subprocess.call([sys.executable, "-m", *args], stdout=handle, stderr=subprocess.STDOUT,
                                   timeout=STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {"ok": code == 0, "exit": code, "seconds": round(time.perf_counter() - started, 1), "log": str(log)}


def bench_batch_sizes(out: Path, workers: int) -> dict:
    """Eager runs at growing batch sizes until out of memory, then compiled at the largest that fit."""
    from hpa_lightning.bench.common import PROFILES
    from hpa_lightning.bench.datasets import tiled_dataset
    from hpa_lightning.bench.gpu import gpu_run
    from hpa_lightning.bench.overhead import project_recipe

    base = PROFILES["full"]
    root = tiled_dataset(out / "bench_cache", base.n, base.unique, base.gpu_size, base.texture_noise, workers)
    recipe = project_recipe(base.gpu_model)
    device = torch.device("cuda", 0)
    runs, fitted = {}, None
    for batch in BATCH_SIZES:
        profile = replace(base, gpu_batch=batch)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            result = gpu_run(root, out / "bench_cache", profile, workers, recipe, 0, False, device)
        except torch.cuda.OutOfMemoryError:
            runs[f"eager_b{batch}"] = {"out_of_memory": True}
            torch.cuda.empty_cache()
            break
        runs[f"eager_b{batch}"] = {**result, "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
        fitted = profile
    if fitted is not None:
        torch.cuda.reset_peak_memory_stats(device)
        result = gpu_run(root, out / "bench_cache", fitted, workers, recipe, 0, True, device)
        runs[f"compiled_b{fitted.gpu_batch}"] = {**result,
                                                 "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return runs


def gpu_check(out: Path, workers: int) -> dict:
    """Run every step into `out` and write `out/gpu_check.json`; returns it."""
    from hpa_lightning.data.synth import generate

    gpu = require_cuda()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"gpu": gpu, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"), "steps": {}}
    try:
        report["steps"]["bench"] = {"ok": True, "runs": bench_batch_sizes(out, workers)}
    except Exception as err:  # a failed step is recorded; the others still run
        report["steps"]["bench"] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    held_out = generate(out / "held_out_src", n=16, seed=99, size=512, workers=workers)
    (out / "held_out").mkdir(exist_ok=True)
    if not (out / "held_out" / "test").exists():
        (held_out / "train").rename(out / "held_out" / "test")
    commands = plan(out)
    for name in ("train", "sweep", "predict"):
        report["steps"][name] = {**_run_step(name, commands[name], out), "command": " ".join(commands[name])}
    sweep_results = sorted((out / "sweep").glob("*/results.json"))
    report["steps"]["sweep"]["jobs_completed"] = len(sweep_results)
    report["steps"]["sweep"]["gpus_claimed"] = [json.loads(p.read_text()).get("gpu") for p in sweep_results]
    report["ok"] = all(step.get("ok") for step in report["steps"].values()) and len(sweep_results) == 2
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out / "gpu_check.json", report)
    return report


def summary(report: dict) -> str:
    lines = [f"gpu-check on {report['gpu']} ({report['gpus']} GPU(s), torch {report['torch']}, CUDA "
             f"{report['cuda']}), {report['date']}: {'PASSED' if report['ok'] else 'FAILED'} in "
             f"{report['wall_time_s']:.0f} s"]
    bench = report["steps"]["bench"]
    for key, run in (bench.get("runs") or {}).items():
        if run.get("out_of_memory"):
            lines.append(f"  bench {key}: out of memory")
        else:
            lines.append(f"  bench {key}: {run['images_per_s']:.0f} img/s, step {run['step_ms']:.1f} ms, data wait "
                         f"{100 * run['data_wait_share']:.1f} % of a step, peak {run['peak_memory_gib']:.1f} GiB")
    if not bench.get("ok"):
        lines.append(f"  bench: {bench.get('error')}")
    for name in ("train", "sweep", "predict"):
        step = report["steps"][name]
        outcome = "ok" if step["ok"] else f"FAILED (exit {step['exit']}, {step['log']})"
        lines.append(f"  {name}: {outcome} in {step['seconds']:.0f} s")
    return "\n".join(lines)
