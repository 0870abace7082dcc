"""The LR range test (usage: hpa_lightning/lr_find.py): Lightning's Tuner over the whole network, its curve
plotted with the suggestion marked, and lr_find.csv / .png / .json in the run folder."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pandas as pd
from hydra.utils import instantiate
from lightning.pytorch.tuner import Tuner
from omegaconf import DictConfig

from hpa_lightning.files import write_json_atomic
from hpa_lightning.runs import layout
from hpa_lightning.training.job import build_module, prepare_datamodule, resolve_finetune, resolve_model


def plot_lr_curve(frame: pd.DataFrame, suggestion: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(frame["lr"], frame["loss"])
    if suggestion is not None:
        at = frame.iloc[(frame["lr"] - suggestion).abs().argmin()]
        ax.plot([suggestion], [at["loss"]], "o", color="red", label=f"suggested lr = {suggestion:.2e}")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lr_find(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    resolve_model(cfg)  # the network of the run this range test is for, at its size
    resolve_finetune(cfg)  # and its LR groups
    datamodule = prepare_datamodule(cfg)
    module = build_module(cfg, datamodule)
    # The sweep lasts num_training steps, however many epochs of a small dataset that takes.
    steps_per_epoch = max(1, len(datamodule.train_dataloader()))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                                     default_root_dir=str(run_dir),
                                     max_epochs=math.ceil(cfg.lr_find.num_training / steps_per_epoch) + 1)
    settings = cfg.lr_find
    finder = Tuner(trainer).lr_find(module, datamodule=datamodule, min_lr=settings.min_lr, max_lr=settings.max_lr,
                                    num_training=settings.num_training, mode="exponential",
                                    early_stop_threshold=settings.early_stop_threshold, update_attr=False)
    frame = pd.DataFrame(finder.results)[["lr", "loss"]]
    suggestion = finder.suggestion(skip_begin=settings.skip_begin, skip_end=settings.skip_end)
    frame.to_csv(run_dir / "lr_find.csv", index=False)
    plot_lr_curve(frame, suggestion, run_dir / "lr_find.png", f"LR range test: {cfg.experiment_name}")
    summary = {"experiment": cfg.experiment_name, "model": cfg.model.name, "suggested_lr": suggestion,
               "min_lr": settings.min_lr, "max_lr": settings.max_lr, "num_points": len(frame)}
    write_json_atomic(run_dir / layout.LR_FIND, summary)
    shown = f"{suggestion:.3g}" if suggestion is not None else "none (too few points; raise lr_find.num_training)"
    print(f"\nsuggested learning rate: {shown}\nrun folder: {run_dir}  (lr_find.png, lr_find.csv)\n"
          f"use it with: optimizer.lr={suggestion:.3g}" if suggestion else f"\nsuggested learning rate: {shown}")
    return summary
