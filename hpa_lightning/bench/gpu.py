"""Section 5: ResNet50 at 512 px, bf16-mixed, channels_last, eager and compiled: images/s, data wait, peak memory."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from hpa_lightning.bench.augment import bench_augment
from hpa_lightning.bench.common import Profile, note, sync_device
from hpa_lightning.bench.loading import TimedIterable, dm_loader_of, shutdown_workers
from hpa_lightning.bench.overhead import build_module


def gpu_run(root: Path, cache: Path, prof: Profile, workers: int, recipe: dict, seed: int, compiled: bool,
            device: torch.device) -> dict:
    """One Lightning fit of `gpu_warmup + gpu_steps` steps fed by the real DataModule; the last `gpu_steps` timed.

    `device` is cuda in the benchmark; the test runs the same code on the CPU at tiny sizes.
    """
    import lightning as L

    from hpa_lightning.data.datamodule import HPADataModule

    waits: list[float] = []

    class TimedDataModule(HPADataModule):
        def train_dataloader(self):
            return TimedIterable(super().train_dataloader(), waits)

    dm = TimedDataModule(root=str(root), image_size=prof.gpu_size, cache_dir=str(cache / "stores"),
                         batch_size=prof.gpu_batch, num_workers=workers, persistent_workers=True)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(recipe, *dm.stats, seed=seed, name=prof.gpu_model, channels_last=True, compile=compiled)
    marks: dict[str, float] = {}
    total_steps = prof.gpu_warmup + prof.gpu_steps

    class Marks(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step  # optimizer steps done
            if step == prof.gpu_warmup:
                sync_device(device)
                marks["start"] = time.perf_counter()
                marks["wait_index"] = len(waits)
            elif step == total_steps:
                sync_device(device)
                marks["end"] = time.perf_counter()

    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, max_epochs=-1, max_steps=total_steps,
                        callbacks=[Marks()])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    total = time.perf_counter() - t0
    seconds = marks["end"] - marks["start"]
    # waits of steps warmup+1 .. total (the batch of step k is fetched before step k runs)
    measured_waits = waits[marks["wait_index"]: marks["wait_index"] + prof.gpu_steps]
    step_s = seconds / prof.gpu_steps
    wait_s = float(np.mean(measured_waits)) if measured_waits else float("nan")
    result = {"images_per_s": prof.gpu_steps * prof.gpu_batch / seconds, "step_ms": step_s * 1e3,
              "data_wait_ms": wait_s * 1e3, "data_wait_share": wait_s / step_s, "fit_total_s": total,
              "compiled": compiled}
    augment = None
    if not compiled:
        rows = list(range(min(prof.gpu_batch, len(dm.datasets["train"]))))
        stacked = dm.datasets["train"].__getitems__(rows)  # already a collated batch
        augment = bench_augment(module, stacked, device, iters=10 if device.type == "cuda" else 1,
                                amp_dtype=torch.bfloat16)
    shutdown_workers(dm_loader_of(trainer))
    return {**result, "augment": augment}


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
