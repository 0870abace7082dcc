"""Test-time augmentation: the 8 dihedral views of a standardised batch on the device, and their mean probabilities."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from hpa_lightning.errors import InferenceError


def _hflip(x: Tensor) -> Tensor:
    return x.flip(-1)


def _vflip(x: Tensor) -> Tensor:
    return x.flip(-2)


def _rot180(x: Tensor) -> Tensor:
    return x.flip(-2, -1)


def _rot90(x: Tensor) -> Tensor:
    return torch.rot90(x, 1, dims=(-2, -1))


def _rot270(x: Tensor) -> Tensor:
    return torch.rot90(x, 3, dims=(-2, -1))


def _transpose(x: Tensor) -> Tensor:
    return x.transpose(-2, -1)


def _anti_transpose(x: Tensor) -> Tensor:
    return x.flip(-2, -1).transpose(-2, -1)


# The 8 symmetries of the square (dihedral group D4), in the order views are added as `tta` grows:
# tta=1 identity; tta=2 + hflip; tta=4 + vflip, rot180 (the flips, a subgroup); tta=8 + the 4 others.
TTA_VIEWS: tuple[tuple[str, Callable[[Tensor], Tensor]], ...] = (
    ("identity", lambda x: x),
    ("hflip", _hflip),
    ("vflip", _vflip),
    ("rot180", _rot180),
    ("rot90", _rot90),
    ("rot270", _rot270),
    ("transpose", _transpose),
    ("anti_transpose", _anti_transpose),
)


TTA_CHOICES = (1, 2, 4, 8)


def tta_views(n: int) -> tuple[tuple[str, Callable[[Tensor], Tensor]], ...]:
    if n not in TTA_CHOICES:
        raise InferenceError(f"tta={n}: must be one of {', '.join(map(str, TTA_CHOICES))}")
    return TTA_VIEWS[:n]


TTA_REDUCTIONS = ("mean", "max")


def crop_windows(image_size: int, crop_size: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """`count` (top, left) positions of `crop_size` windows in `image_size` images, drawn once from a seeded
    generator: the same crop views for every image and every run (bestfitting's random-crop TTA, made repeatable)."""
    if crop_size > image_size:
        raise InferenceError(f"crop size {crop_size} is larger than the images ({image_size})")
    generator = torch.Generator().manual_seed(seed)
    corners = torch.randint(0, image_size - crop_size + 1, (count, 2), generator=generator)
    return [(int(top), int(left)) for top, left in corners]


@torch.inference_mode()
def tta_probabilities(net: nn.Module, x: Tensor, tta: int = 1, channels_last: bool = False,
                      crops: Sequence[tuple[int, int]] = (), crop_size: int | None = None,
                      reduce: str = "mean") -> Tensor:
    """Sigmoid probabilities (B, C) of `net` over the first `tta` dihedral views of the standardised batch `x`, or
    of each `crop_size` window at `crops` (top, left), reduced by their mean or their maximum."""
    if reduce not in TTA_REDUCTIONS:
        raise InferenceError(f"tta_reduce={reduce}: must be one of {', '.join(TTA_REDUCTIONS)}")
    inputs = [x[..., top:top + crop_size, left:left + crop_size] for top, left in crops] if crops else [x]
    result, count = None, 0
    for image in inputs:
        for _, view in tta_views(tta):
            v = view(image)
            v = v.contiguous(memory_format=torch.channels_last) if channels_last else v.contiguous()
            probs = torch.sigmoid(net(v).float())
            if result is None:
                result = probs
            else:
                result = result + probs if reduce == "mean" else torch.maximum(result, probs)
            count += 1
    return result / count if reduce == "mean" else result
