"""Section 3: an epoch through Lightning against a plain PyTorch loop doing the same work."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from hpa_lightning.bench.bench_data import tiled_dataset
from hpa_lightning.bench.common import REPO, Profile, median, note, seed_all
from hpa_lightning.bench.loading import dm_loader_of, shutdown_workers


def project_recipe(model_name: str) -> dict:
    """Loss, optimizer and augmentation of the demo recipe, from the real configs (focal_g02 + preset demo)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from hpa_lightning.training.finetune import resolve_recipe

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=focal_g02", "+preset=demo"])

    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if node is not None else None

    return {"model": {**plain(cfg.model), "name": model_name, "pretrained": False},
            "loss": plain(cfg.loss), "optimizer": plain(cfg.optimizer), "augment": plain(cfg.augment),
            "lr_ratios": resolve_recipe(cfg.finetune.frozen_epochs, cfg.finetune.lr_ratios, pretrained=False)[1]}


def build_module(recipe: dict, mean: list[float], std: list[float], seed: int, name: str | None = None,
                 channels_last: bool = False, compile: bool = False):  # noqa: A002 - HPAModule's argument
    import lightning as L

    from hpa_lightning.models.module import HPAModule

    L.seed_everything(seed, verbose=False)
    model = {**recipe["model"], **({"name": name} if name else {})}
    return HPAModule(model=model, loss=recipe["loss"], optimizer=recipe["optimizer"], scheduler=None,
                     lr_ratios=recipe["lr_ratios"], augment=recipe["augment"], mean=mean, std=std,
                     channels_last=channels_last, compile=compile)


def _lightning_timer():
    import lightning as L

    class StepTimer(L.Callback):
        """Wall-clock stamps at the end of every training batch (after the optimizer step and logging hooks)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.stamps.append(time.perf_counter())

    return StepTimer()


def lightning_epoch(recipe: dict, dm, seed: int, limit_batches: int | float = 1.0) -> dict:
    import lightning as L

    module = build_module(recipe, *dm.stats, seed=seed)
    timer = _lightning_timer()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, max_epochs=1,
                        limit_train_batches=limit_batches, callbacks=[timer])
    L.seed_everything(seed, verbose=False)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    total = time.perf_counter() - t0
    shutdown_workers(dm_loader_of(trainer))
    return {"total_s": total, "stamps": timer.stamps}


def plain_epoch(recipe: dict, dm, seed: int, limit_batches: int | None = None) -> dict:
    """The same work without Lightning: seed, model, loader, optimizer, transform, loss, backward, step."""
    module = build_module(recipe, *dm.stats, seed=seed)
    t0 = time.perf_counter()
    loader = dm.train_dataloader()
    optimizer = module.configure_optimizers()
    module.train()
    seed_all(seed)
    stamps = []
    for step, batch in enumerate(loader):
        if limit_batches is not None and step >= limit_batches:
            break
        image = module.transform(batch["image"], train=True)
        loss = module.criterion(module(image), batch["target"])
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    total = time.perf_counter() - t0
    shutdown_workers(loader)
    return {"total_s": total, "stamps": stamps}


def step_span(stamps: list[float]) -> tuple[float, list[float]]:
    """Time from the end of the first step to the end of the last, and the step intervals in between.

    Excludes the first step (worker start-up, first-batch latency) on both sides, so what is compared is the
    steady-state cost of an epoch's steps: data fetch + transform + forward/backward/step + the framework's hooks.
    """
    intervals = list(np.diff(stamps))
    return (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan"), intervals


def overhead_datamodule(cache: Path, prof: Profile, workers: int):
    from hpa_lightning.data.datamodule import HPADataModule

    root = tiled_dataset(cache, prof.ovh_n, prof.ovh_n, prof.ovh_size, 0.0, workers)
    dm = HPADataModule(root=str(root), image_size=prof.ovh_size, cache_dir=str(cache / "stores"),
                       batch_size=prof.ovh_batch, num_workers=workers, persistent_workers=workers > 0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def bench_overhead(dm, recipe: dict, prof: Profile, repeats: int, seed: int) -> dict:
    note(f"overhead: warm-up ({prof.warmup_steps} steps each)")
    lightning_epoch(recipe, dm, seed, limit_batches=prof.warmup_steps)
    plain_epoch(recipe, dm, seed, limit_batches=prof.warmup_steps)
    runs: dict[str, list[dict]] = {"lightning": [], "plain": []}
    for r in range(repeats):
        order = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")  # ABBA cancels linear drift
        for name in order:
            note(f"overhead: run {r + 1}/{repeats} {name}")
            run = lightning_epoch(recipe, dm, seed) if name == "lightning" else plain_epoch(recipe, dm, seed)
            span, intervals = step_span(run["stamps"])
            runs[name].append({"total_s": run["total_s"], "span_s": span, "steps": len(run["stamps"]),
                               "intervals": intervals})
    lit, pln = runs["lightning"], runs["plain"]
    steps = lit[0]["steps"]
    if any(run["steps"] != steps for run in lit + pln):
        raise RuntimeError(f"overhead: step counts differ: {[run['steps'] for run in lit + pln]}")
    lit_span, pln_span = median(r["span_s"] for r in lit), median(r["span_s"] for r in pln)
    lit_step = median(x for r in lit for x in r["intervals"])
    pln_step = median(x for r in pln for x in r["intervals"])
    return {"ratio": lit_span / pln_span, "per_step_median_ratio": lit_step / pln_step, "steps_per_epoch": steps,
            "repeats": repeats, "lightning_span_s": lit_span, "plain_span_s": pln_span,
            "lightning_step_ms": lit_step * 1e3, "plain_step_ms": pln_step * 1e3,
            "overhead_per_step_ms": (lit_span - pln_span) / max(1, steps - 1) * 1e3,
            "lightning_fit_total_s": median(r["total_s"] for r in lit),
            "plain_total_s": median(r["total_s"] for r in pln),
            "runs": {name: [{k: v for k, v in run.items() if k != "intervals"} for run in rs]
                     for name, rs in runs.items()},
            "model": recipe["model"]["name"], "image_size": prof.ovh_size, "batch_size": prof.ovh_batch,
            "optimizer": str(recipe["optimizer"]["_target_"]).rsplit(".", 1)[-1],
            "loss": str(recipe["loss"]["_target_"]).rsplit(".", 1)[-1], "train_samples": len(dm.datasets["train"])}
