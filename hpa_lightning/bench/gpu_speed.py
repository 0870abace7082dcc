"""Section 5: ResNet50 at 512 px, bf16-mixed, channels_last, eager and compiled: images/s, data wait, peak memory.

What a figure here means:
- cudnn.benchmark is on (Lightning's `benchmark=True`): inputs have one size, so each convolution's fastest algorithm
  is timed at the first step and reused; without it cuDNN takes a heuristic choice, often slower.
- Steps are timed in windows of at least `min_steps` steps and `min_seconds` seconds, the device synchronised at
  each window's ends only (a sync per step would remove the overlap of host and device that training has): the step
  time is the median over the windows, their spread beside it.
- One epoch lasts longer than all windows together (the train split repeated), so no epoch restart (a new sampler
  pass, the read-ahead refilled) falls inside a window; `epoch_restarts_timed` counts any that still do.
- Host reads (`.item()`, `if tensor:`, `nonzero`, `tolist`: each makes the host wait for the device) are counted per
  step inside the windows, on the run's device type and the training thread (reader threads touch host tensors). On
  the CPU (the GPU check's rehearsal) every tensor is on the run's device: AdamW's step counters, host tensors on a
  GPU too and read there without a wait, count as well.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpa_lightning.bench.augment_speed import bench_augment
from hpa_lightning.bench.common import Profile, note, sync_device
from hpa_lightning.bench.loading import TimedIterable, dm_loader_of, shutdown_workers
from hpa_lightning.bench.overhead import build_module

EPOCH_STEPS = 1000  # steps of one benchmark epoch: more than warm-up and windows take at any batch size tried
READS = ("item", "__bool__", "nonzero", "tolist", "__float__", "__int__", "__index__")


@dataclass(frozen=True)
class Windows:
    """How steps are timed: `warmup_steps` untimed (compilation, cuDNN autotuning, allocator growth), then `count`
    windows of at least `min_steps` steps and `min_seconds` seconds each."""

    count: int = 3
    min_steps: int = 20
    min_seconds: float = 5.0
    warmup_steps: int = 10


def profile_windows(prof: Profile) -> Windows:
    return Windows(count=prof.gpu_windows, min_steps=prof.gpu_steps, min_seconds=prof.gpu_window_s,
                   warmup_steps=prof.gpu_warmup)


class HostReads:
    """Counts host reads of tensors on `device_type` made by the thread that installed it, while `active`."""

    def __init__(self, device_type: str) -> None:
        self.device_type, self.count, self.active = device_type, 0, False
        self.thread = threading.get_ident()
        self.saved: dict[str, object] = {}

    def _wrap(self, original):
        def read(tensor, *args, **kwargs):
            if (self.active and threading.get_ident() == self.thread and isinstance(tensor, torch.Tensor)
                    and tensor.device.type == self.device_type):
                self.count += 1
            return original(tensor, *args, **kwargs)
        return read

    def install(self) -> None:
        for name in READS:
            self.saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(self.saved[name]))
        self.saved["torch.nonzero"] = torch.nonzero
        torch.nonzero = self._wrap(torch.nonzero)

    def uninstall(self) -> None:
        for name, original in self.saved.items():
            if name == "torch.nonzero":
                torch.nonzero = original
            else:
                setattr(torch.Tensor, name, original)
        self.saved.clear()

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _timer_callback(windows: Windows, device: torch.device, waits: list[float], stop_at: float | None):
    import lightning as L

    class WindowTimer(L.Callback):
        """Opens and closes the timed windows at the ends of training batches; stops the fit after the last."""

        def __init__(self) -> None:
            self.steps = 0
            self.records: list[dict] = []
            self.open_at: float | None = None
            self.window: dict = {}
            self.restarts = 0
            self.cut = False
            self.started = time.perf_counter()
            self.warm_at: float | None = None
            self.reads = HostReads(device.type)

        def on_train_start(self, trainer, pl_module) -> None:
            self.started = time.perf_counter()

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if self.open_at is not None:
                self.restarts += 1

        def open(self, now: float) -> None:
            self.open_at = now
            self.window = {"steps": 0, "reads": [], "stamps": [now], "wait_index": len(waits)}
            self.reads.take()

        def close(self, trainer) -> None:
            sync_device(device)
            end = time.perf_counter()
            window, seconds = self.window, end - self.open_at
            measured = waits[window["wait_index"]: window["wait_index"] + window["steps"]]
            self.records.append({"steps": window["steps"], "seconds": seconds,
                                 "step_ms": 1e3 * seconds / window["steps"],
                                 "intervals_ms": list(1e3 * np.diff(window["stamps"])),
                                 "data_wait_ms": 1e3 * float(np.mean(measured)) if measured else float("nan"),
                                 "reads": window["reads"]})
            late = stop_at is not None and time.monotonic() >= stop_at
            if len(self.records) >= windows.count or late:
                self.cut = late and len(self.records) < windows.count
                self.open_at = None
                self.reads.active = False
                trainer.should_stop = True
            else:
                self.open(end)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.steps += 1
            now = time.perf_counter()
            if self.open_at is None:
                if self.steps >= windows.warmup_steps and not trainer.should_stop:
                    sync_device(device)
                    self.warm_at = time.perf_counter()
                    self.reads.install()
                    self.reads.active = True
                    self.open(self.warm_at)
                return
            window = self.window
            window["steps"] += 1
            window["stamps"].append(now)
            window["reads"].append(self.reads.take())
            due = window["steps"] >= windows.min_steps and now - self.open_at >= windows.min_seconds
            if due or (stop_at is not None and time.monotonic() >= stop_at):
                self.close(trainer)

    return WindowTimer()


def summarize_windows(records: list[dict], batch: int) -> dict:
    """Median and spread over the windows; percentiles of the (unsynchronised) step intervals inside them."""
    if not records:
        raise RuntimeError("no timed window completed (the deadline came first)")
    step_ms = sorted(r["step_ms"] for r in records)
    median_ms = float(np.median(step_ms))
    intervals = np.concatenate([r["intervals_ms"] for r in records])
    reads = [n for r in records for n in r["reads"]]
    waits = [r["data_wait_ms"] for r in records if math.isfinite(r["data_wait_ms"])]
    wait_ms = float(np.mean(waits)) if waits else float("nan")
    return {"images_per_s": 1e3 * batch / median_ms, "step_ms": median_ms, "step_ms_min": step_ms[0],
            "step_ms_max": step_ms[-1], "step_spread": (step_ms[-1] - step_ms[0]) / median_ms,
            "interval_ms_p10_p50_p90": [float(np.percentile(intervals, q)) for q in (10, 50, 90)],
            "windows": [{"steps": r["steps"], "seconds": round(r["seconds"], 3)} for r in records],
            "timed_steps": sum(r["steps"] for r in records),
            "host_reads_per_step": float(np.median(reads)) if reads else float("nan"),
            "host_reads_max": max(reads) if reads else 0,
            "data_wait_ms": wait_ms, "data_wait_share": wait_ms / median_ms}


def gpu_run(root: Path, cache: Path, prof: Profile, workers: int, recipe: dict, seed: int, compiled: bool,
            device: torch.device, windows: Windows | None = None, stop_at: float | None = None,
            compile_backend: str | None = None, augment: bool = True) -> dict:
    """One Lightning fit fed by the real DataModule: `windows.warmup_steps` steps, then the timed windows.

    `device` is cuda in the benchmark; the tests and the GPU check's rehearsal run the same code on the CPU at tiny
    sizes. `stop_at` (time.monotonic()) ends the windows early; `compile_backend` replaces inductor (the
    rehearsal's `eager` traces the model with dynamo, without generating code).
    """
    import lightning as L

    from hpa_lightning.data.datamodule import HPADataModule
    from hpa_lightning.data.loader import PackedDataset

    windows = windows or profile_windows(prof)
    waits: list[float] = []

    class TimedDataModule(HPADataModule):
        def setup(self, stage: str | None = None) -> None:
            fresh = self.store is None
            super().setup(stage)
            train = self.datasets["train"]
            if fresh:  # one epoch outlasts every window: the split repeated (a view of the same store rows)
                repeats = max(1, math.ceil(EPOCH_STEPS * prof.gpu_batch / len(train)))
                self.datasets["train"] = PackedDataset(self.store, np.tile(train.indices, repeats),
                                                       pin_memory=train.pin_memory)

        def train_dataloader(self):
            return TimedIterable(super().train_dataloader(), waits)

    dm = TimedDataModule(root=str(root), image_size=prof.gpu_size, cache_dir=str(cache / "stores"),
                         batch_size=prof.gpu_batch, num_workers=workers, persistent_workers=True)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(recipe, *dm.stats, seed=seed, name=prof.gpu_model, channels_last=True,
                          compile=compiled and compile_backend is None)
    if compiled and compile_backend is not None:
        module.net.compile(backend=compile_backend)  # in place, as HPAModule.configure_model does with inductor
    timer = _timer_callback(windows, device, waits, stop_at)
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        benchmark=True, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, max_epochs=-1,
                        max_steps=windows.warmup_steps + windows.count * 100_000, callbacks=[timer])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        timer.reads.uninstall()
    total = time.perf_counter() - t0
    result = {**summarize_windows(timer.records, prof.gpu_batch), "batch_size": prof.gpu_batch,
              "fit_total_s": total, "warmup_s": (timer.warm_at or t0) - t0, "compiled": compiled,
              "compile_backend": (compile_backend or "inductor") if compiled else None,
              "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "epoch_restarts_timed": timer.restarts,
              "windows_cut_by_deadline": timer.cut}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    aug = None
    if augment and not compiled:
        rows = list(range(min(prof.gpu_batch, len(dm.datasets["train"]))))
        stacked = dm.datasets["train"].__getitems__(rows)  # already a collated batch
        aug = bench_augment(module, stacked, device, iters=10 if device.type == "cuda" else 1,
                            amp_dtype=torch.bfloat16)
    shutdown_workers(dm_loader_of(trainer))
    return {**result, "augment": aug}


def bench_gpu(root: Path, cache: Path, prof: Profile, workers: int, recipe: dict, seed: int,
              device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} (dry run)"
    runs = {}
    for compiled in (False, True) if prof.gpu_compile else (False,):
        note(f"gpu: {prof.gpu_model} at {prof.gpu_size} px, bf16-mixed, channels_last, compile={compiled}")
        runs["compiled" if compiled else "eager"] = gpu_run(root, cache, prof, workers, recipe, seed, compiled,
                                                            device)
    eager = runs["eager"]
    compiled = runs.get("compiled")
    best = max(r["images_per_s"] for r in runs.values())
    return {"device": name, "model": prof.gpu_model, "image_size": prof.gpu_size, "batch_size": prof.gpu_batch,
            "workers": workers, "eager": eager, "compiled": compiled,
            "compile_speedup": compiled["images_per_s"] / eager["images_per_s"] if compiled else None,
            "best_images_per_s": best, "data_wait_share": (compiled or eager)["data_wait_share"],
            "augment": eager.get("augment")}
