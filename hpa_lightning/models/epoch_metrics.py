"""The evaluation epoch's outputs as a torchmetrics `Metric`: gathered over DDP ranks, each store row counted once.

Lightning's `DistributedSampler` pads every rank to the same number of samples by repeating some, so metrics that
accumulate what each rank saw (torchmetrics' own `MultilabelF1Score`, `MultilabelAUROC`) count every repeat again.
This metric keeps the epoch's probabilities, targets and store rows as concatenated states
(`dist_reduce_fx="cat"`, gathered by torchmetrics on `compute`), drops the repeats by row, and scores the rest with
`hpa_lightning.metrics.summarize`, the definition that results.json uses too: torchmetrics.functional's multilabel F1
and exact AUROC, with the project's ``>=`` decisions and AUC over the classes with both labels (that module's
docstring).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from hpa_lightning import metrics


class EpochOutputs(Metric):
    """Probabilities ``(N, C)``, 0/1 targets ``(N, C)`` and store rows ``(N,)`` of one evaluation epoch.

    `compute` returns ``{"outputs": {"probs", "targets", "rows"}, "summary": ...}``: the outputs as numpy arrays
    with each row once (its first occurrence) in ascending row order, and `metrics.summarize` of them (``macro_f1``
    and ``per_class_f1`` at threshold 0.5, ``roc_auc`` over the classes with both labels present, ...), or None when
    the epoch had no samples. Every rank returns the same. The states are not persistent: checkpoints do not hold
    them, and loading one is unaffected.
    """

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, targets: Tensor, rows: Tensor) -> None:
        if probs.ndim != 2 or probs.shape[1] != self.num_classes or targets.shape != probs.shape:
            raise ValueError(f"probs and targets must both be (N, {self.num_classes}), got {tuple(probs.shape)} and "
                             f"{tuple(targets.shape)}")
        if rows.shape != probs.shape[:1]:
            raise ValueError(f"rows must be ({probs.shape[0]},), got {tuple(rows.shape)}")
        self.probs.append(probs.detach())
        self.targets.append(targets.detach())
        self.rows.append(rows.detach())

    @staticmethod
    def _state_array(state: list[Tensor] | Tensor, shape: tuple[int, ...]) -> np.ndarray:
        # synced, a state is one tensor; unsynced (one process), the list of the epoch's batches. A sync where no rank
        # had a batch leaves torchmetrics' 1-D empty placeholder, reshaped here.
        if isinstance(state, list) and not state:
            return np.zeros(shape, dtype=np.float32)
        return dim_zero_cat(state).cpu().numpy().reshape(-1, *shape[1:])

    def compute(self) -> dict[str, Any]:
        probs = self._state_array(self.probs, (0, self.num_classes))
        targets = self._state_array(self.targets, (0, self.num_classes))
        rows = self._state_array(self.rows, (0,)).astype(np.int64, copy=False)
        _, first = np.unique(rows, return_index=True)
        outputs = {"probs": probs[first], "targets": targets[first], "rows": rows[first]}
        summary = metrics.summarize(outputs["targets"], outputs["probs"]) if len(first) else None
        return {"outputs": outputs, "summary": summary}

