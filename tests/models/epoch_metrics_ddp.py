"""Helpers of tests/models/test_epoch_metrics.py, apart so that the gloo processes it spawns import only these."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hpa_lightning.models.epoch_metrics import EpochOutputs

C = 6


def epoch_data(seed: int, n: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """Targets with the awkward classes (0: no positive, 1: exactly one negative, 2: one positive) and probabilities
    with ties, some exactly at the 0.5 decision threshold."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, C)) < 0.4).astype(np.float32)
    targets[:, 0] = 0
    targets[:, 1] = 1
    targets[rng.integers(n), 1] = 0
    targets[:, 2] = 0
    targets[rng.integers(n), 2] = 1
    probs = np.clip(0.3 * targets + rng.normal(0.35, 0.2, (n, C)), 0, 1).round(2).astype(np.float32)
    probs[rng.random((n, C)) < 0.05] = 0.5
    return targets, probs


def feed(metric: EpochOutputs, targets: np.ndarray, probs: np.ndarray, rows: np.ndarray, batch: int = 7) -> None:
    for start in range(0, len(rows), batch):
        part = slice(start, start + batch)
        metric.update(torch.from_numpy(probs[part]), torch.from_numpy(targets[part]), torch.from_numpy(rows[part]))


def ddp_worker(rank: int, world: int, out: str) -> None:
    """One rank's evaluation epoch as Lightning's DistributedSampler deals it; writes what `compute` gave the rank."""
    # a file rendezvous: no port to find free
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        targets, probs = epoch_data(6, n=41)
        # DistributedSampler's split: rank r takes every world-th sample of the list padded with its first ones
        order = np.r_[np.arange(41), np.arange(world * math.ceil(41 / world) - 41)]
        mine = order[rank::world]
        metric = EpochOutputs(C)
        # other batch sizes on each rank: states of different list lengths, which torchmetrics concatenates first
        feed(metric, targets[mine], probs[mine], mine + 500, batch=5 + 3 * rank)
        result = metric.compute()
        torch.save({"rows": torch.from_numpy(result["outputs"]["rows"]), "macro_f1": result["summary"]["macro_f1"],
                    "roc_auc": result["summary"]["roc_auc"], "local": len(metric.rows)},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()

