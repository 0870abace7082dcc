"""Multi-label losses on logits: sigmoid focal loss (no alpha term), plain BCE as its gamma=0 case, the Lovasz
hinge, and weighted sums of them.

Hydra configs build them by `_target_`, e.g. ``_target_: hpa_lightning.models.losses.FocalLoss`` with
``gamma: 2.0`` or ``_target_: hpa_lightning.models.losses.bce_loss``; ``pos_weight`` may be a list of 28 floats
(see `positive_class_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FocalLoss", "LovaszHingeLoss", "WeightedLossSum", "bce_loss", "positive_class_weights"]


def _as_weight_tensor(pos_weight: Sequence[float] | np.ndarray | Tensor) -> Tensor:
    if isinstance(pos_weight, Tensor):
        weight = pos_weight.detach().to(torch.float32)
    else:  # a list, tuple, numpy array or OmegaConf ListConfig; a single number is refused below (0-D)
        weight = torch.as_tensor(np.asarray(pos_weight, dtype=np.float32))
    if weight.ndim != 1 or weight.numel() == 0:
        raise ValueError(f"loss.pos_weight must be a non-empty 1-D sequence of per-class weights, got shape "
                         f"{tuple(weight.shape)}")
    if not torch.isfinite(weight).all() or (weight <= 0).any():
        raise ValueError("loss.pos_weight must be finite and > 0 for every class")
    return weight.clone()


class FocalLoss(torch.nn.Module):
    """Sigmoid focal loss ``-(1 - p_t)**gamma * log(p_t)``, averaged over samples and classes.

    ``p_t`` is ``sigmoid(logit)`` for positive targets and ``1 - sigmoid(logit)`` for negatives, as in
    ``torchvision.ops.sigmoid_focal_loss(..., alpha=-1)``; there is no alpha balancing term. With ``gamma=0`` this is
    exactly ``F.binary_cross_entropy_with_logits`` (mean), including its ``pos_weight`` semantics: the per-class
    weight multiplies the positive (``y=1``) term only.

    Both factors are computed in log space from the logits (``-log p_t`` via BCE-with-logits, ``log(1 - p_t)`` via
    ``logsigmoid``) so the loss and its gradient stay finite for saturated logits (e.g. +-100) and any ``gamma >= 0``;
    the naive ``(1 - exp(-bce))**gamma`` has an infinite derivative at ``p_t = 1`` when ``gamma < 1``.

    Args:
        gamma: focusing parameter, ``>= 0``.
        pos_weight: optional per-class positive weights, length = number of classes (logits' last dim). Stored as a
            non-persistent buffer: it follows ``.to(device)`` but is not written to checkpoints, since it is derived
            from the config/training labels and would otherwise break loading into a model built without it.
    """

    pos_weight: Tensor | None

    def __init__(self, gamma: float = 2.0, pos_weight: Sequence[float] | np.ndarray | Tensor | None = None) -> None:
        super().__init__()
        gamma = float(gamma)
        if not np.isfinite(gamma) or gamma < 0:
            raise ValueError(f"loss.gamma must be a finite number >= 0, got {gamma}")
        self.gamma = gamma
        weight = None if pos_weight is None else _as_weight_tensor(pos_weight)
        self.register_buffer("pos_weight", weight, persistent=False)

    def extra_repr(self) -> str:
        classes = "None" if self.pos_weight is None else f"<{self.pos_weight.numel()} classes>"
        return f"gamma={self.gamma}, pos_weight={classes}"

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same "
                             "shape")
        if logits.ndim == 0:
            raise ValueError("logits must have a class dimension")
        # Half-precision logits (AMP) lose too much in exp/log; the loss is computed in float32 at least.
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        targets = targets.to(logits.dtype)
        pos_weight = self.pos_weight
        if pos_weight is not None:
            if pos_weight.numel() != logits.shape[-1]:
                raise ValueError(f"loss.pos_weight has {pos_weight.numel()} entries but logits have "
                                 f"{logits.shape[-1]} classes")
            pos_weight = pos_weight.to(device=logits.device, dtype=logits.dtype)

        # -log(p_t), with pos_weight on the positive term exactly as BCEWithLogitsLoss applies it.
        ce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
        if self.gamma == 0:
            return ce.mean()
        # 1 - p_t = t * (1 - p) + (1 - t) * p, in log space: logaddexp(log t + logsig(-x), log(1 - t) + logsig(x)).
        # For 0/1 targets one branch is log(0) = -inf, which logaddexp handles with a zero (not NaN) gradient.
        log_one_minus_pt = torch.logaddexp(
            torch.log(targets) + F.logsigmoid(-logits),
            torch.log1p(-targets) + F.logsigmoid(logits),
        )
        modulator = torch.exp(self.gamma * log_one_minus_pt)
        return (modulator * ce).mean()


def bce_loss(pos_weight: Sequence[float] | np.ndarray | Tensor | None = None) -> FocalLoss:
    """Mean binary cross-entropy on logits (optionally with per-class ``pos_weight``): ``FocalLoss(gamma=0)``."""
    return FocalLoss(gamma=0.0, pos_weight=pos_weight)


def _lovasz_grad(sorted_labels: Tensor) -> Tensor:
    """Increments of the Jaccard loss along elements sorted by decreasing error (Berman et al. 2018, Eq. 8)."""
    positives = sorted_labels.sum()
    intersection = positives - sorted_labels.cumsum(0)
    union = positives + (1.0 - sorted_labels).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def _flat_lovasz_hinge(logits: Tensor, labels: Tensor) -> Tensor:
    errors = 1.0 - logits * (2.0 * labels - 1.0)
    errors_sorted, order = torch.sort(errors, descending=True)
    return torch.dot(F.relu(errors_sorted), _lovasz_grad(labels[order]))


class LovaszHingeLoss(torch.nn.Module):
    """Lovasz hinge (Berman, Rannen Triki & Blaschko, CVPR 2018): a convex surrogate of the Jaccard loss.

    For image labels the "pixels" are the (image, class) pairs of the batch (`per_image=False`, as bestfitting used
    it for HPA 2018) or the 28 classes of each image, averaged over images (`per_image=True`). Written once here
    rather than taken from a segmentation library, whose versions expect pixel maps; tests/models/test_lovasz.py
    checks it against the definition by brute force over every ordering.
    """

    def __init__(self, per_image: bool = False) -> None:
        super().__init__()
        self.per_image = bool(per_image)

    def extra_repr(self) -> str:
        return f"per_image={self.per_image}"

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.shape != targets.shape or logits.ndim != 2:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be "
                             "(batch, classes)")
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        targets = targets.to(logits.dtype)
        if self.per_image:
            return torch.stack([_flat_lovasz_hinge(logits[i], targets[i]) for i in range(len(logits))]).mean()
        return _flat_lovasz_hinge(logits.reshape(-1), targets.reshape(-1))


class WeightedLossSum(torch.nn.Module):
    """`sum_k weights[k] * losses[k](logits, targets)`, e.g. focal + Lovasz hinge (`loss=focal_lovasz`).

    `gamma` and `pos_weight`, when given, are the settings of the focal terms, so `loss.gamma=0.5` and
    `loss.pos_weight=auto` act on a sum as they do on a single focal loss.
    """

    def __init__(self, losses: Sequence[torch.nn.Module], weights: Sequence[float] | None = None,
                 gamma: float | None = None, pos_weight: Sequence[float] | np.ndarray | Tensor | None = None) -> None:
        super().__init__()
        if not losses:
            raise ValueError("loss.losses must name at least one loss")
        weights = [1.0] * len(losses) if weights is None else [float(w) for w in weights]
        if len(weights) != len(losses):
            raise ValueError(f"loss.weights has {len(weights)} entries for {len(losses)} losses")
        if not all(np.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"loss.weights must be finite and >= 0, got {weights}")
        self.weights = weights
        self.losses = torch.nn.ModuleList(
            FocalLoss(gamma=term.gamma if gamma is None else gamma,
                      pos_weight=term.pos_weight if pos_weight is None else pos_weight)
            if isinstance(term, FocalLoss) else term
            for term in losses)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return sum(self.weights[i] * term(logits, targets) for i, term in enumerate(self.losses))


def positive_class_weights(labels: np.ndarray, power: float = 0.5, max_weight: float = 50.0) -> np.ndarray:
    """Per-class positive weights ``(neg / pos) ** power`` from an ``(N, C)`` multi-hot training label matrix.

    Weights are clipped to ``[1, max_weight]`` so common classes are never down-weighted and the rarest ones
    (HPA has classes with ~10 training images) do not dominate. ``power=0.5`` (square root) is a softer version of
    the full ``neg/pos`` balance. A class with no positives gets ``1.0``: there is no positive term to weight, and a
    large weight would only matter if positives appear later, unseen in the data it was computed from.

    Returns:
        float64 array of shape ``(C,)``; pass ``.tolist()`` to a Hydra/OmegaConf config.
    """
    y = np.asarray(labels)
    if y.ndim != 2:
        raise ValueError(f"labels must be a 2-D (N, C) multi-hot matrix, got shape {y.shape}")
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    if max_weight < 1:
        raise ValueError(f"max_weight must be >= 1, got {max_weight}")
    pos = (y > 0.5).sum(axis=0)  # bool labels as they are, soft labels positive above one half
    ratio = np.where(pos > 0, (y.shape[0] - pos) / np.maximum(pos, 1), 1.0)
    return np.clip(ratio**power, 1.0, max_weight)
