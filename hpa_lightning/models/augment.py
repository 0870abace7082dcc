"""Device-side input pipeline: uint8 RGBY batches become standardised floats, augmented in training only.

Runs on whatever device the batch was moved to (Lightning's `on_after_batch_transfer`), so the loader only ships
uint8 and the GPU does the arithmetic. The four channels of a sample always get the same geometric transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import Tensor, nn


class Standardize(nn.Module):
    """uint8 (B, C, H, W) -> float, standardised with per-channel train statistics given in [0, 1] units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean) / self.std


class RandomRot90(nn.Module):
    """Each sample turned by 0, 90, 180 or 270 degrees, the four equally likely, exactly (`torch.rot90`, no warp).

    Not kornia's `RandomRotation90(times=(0, 3))`: it rounds a continuous draw from [0, 3], so 0 and 270 degrees come
    up half as often as 90 and 180, and it rotates by interpolation.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"RandomRot90 needs square images, got {x.shape[-2]}x{x.shape[-1]}")
        turns = torch.randint(0, 4, (x.shape[0],), device=x.device)
        out = x.clone()
        for k in (1, 2, 3):
            chosen = torch.nonzero(turns == k).flatten()
            if chosen.numel():
                out[chosen] = torch.rot90(x[chosen], k, dims=(-2, -1))
        return out


def build_augmentation(rot90: bool = True, rotation_degrees: float = 10.0, hflip: float = 0.5, vflip: float = 0.5,
                       brightness: float = 0.1, contrast: float = 0.1, p_lighting: float = 0.5) -> nn.Module:
    """The poster's "random rotate, flip, lighting" as a kornia pipeline over [0, 1] images, each sample drawn anew.

    Lighting is applied before standardisation so that brightness/contrast factors mean the same for every channel.
    """
    ops: list[nn.Module] = []
    if rotation_degrees > 0:
        ops.append(K.RandomRotation(degrees=rotation_degrees, p=0.5))
    if hflip > 0:
        ops.append(K.RandomHorizontalFlip(p=hflip))
    if vflip > 0:
        ops.append(K.RandomVerticalFlip(p=vflip))
    if brightness > 0:
        ops.append(K.RandomBrightness(brightness=(1.0 - brightness, 1.0 + brightness), p=p_lighting))
    if contrast > 0:
        ops.append(K.RandomContrast(contrast=(1.0 - contrast, 1.0 + contrast), p=p_lighting))
    stages: list[nn.Module] = [RandomRot90()] if rot90 else []
    if ops:
        stages.append(K.AugmentationSequential(*ops, data_keys=["input"]))
    return nn.Sequential(*stages) if stages else nn.Identity()


EVAL_CROPS = ("full", "center")


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central `size` x `size` window of (..., H, W) images (the upper-left one when H - size is odd)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def check_crop(crop: dict | None, image_size: int | None = None) -> tuple[int | None, str]:
    """(size, eval) of a `crop` node, one line naming the key when wrong (`ValueError`)."""
    crop = crop or {}
    size, evaluation = crop.get("size"), crop.get("eval", "full")
    if evaluation not in EVAL_CROPS:
        raise ValueError(f"crop.eval={evaluation!r}: expected one of {', '.join(EVAL_CROPS)}")
    if size is None:
        return None, evaluation
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"crop.size={size!r}: expected a whole number of pixels >= 8, or null")
    if image_size is not None and size > image_size:
        raise ValueError(f"crop.size={size} is larger than the packed images (data.image_size={image_size}): pack "
                         f"at the higher resolution and crop below it")
    return size, evaluation


class Crop(nn.Module):
    """Crops from a higher resolution: in training one random `size` window per sample (kornia's RandomCrop, the
    same window for the four channels), in evaluation the full image (`eval: full`; global pooling takes any size)
    or the central window (`eval: center`). No `size`: the image as it is."""

    def __init__(self, size: int | None = None, eval: str = "full"):  # noqa: A002 - the config key's name
        super().__init__()
        self.size, self.eval_mode = check_crop({"size": size, "eval": eval})
        self.random = K.RandomCrop((self.size, self.size)) if self.size else None

    def forward(self, x: Tensor, train: bool) -> Tensor:
        if self.size is None:
            return x
        if min(x.shape[-2:]) < self.size:
            raise ValueError(f"crop.size={self.size} is larger than the images ({x.shape[-2]}x{x.shape[-1]})")
        if train:
            return self.random(x)
        return center_crop(x, self.size) if self.eval_mode == "center" else x


class DeviceTransform(nn.Module):
    """The whole device-side transform: to float in [0, 1], crop (random when `train`), augment when `train`,
    standardise."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: dict | None = None,
                 crop: dict | None = None):
        super().__init__()
        self.standardize = Standardize(mean, std)
        self.augment = build_augmentation(**augment) if augment is not None else nn.Identity()
        self.crop = Crop(**(crop or {}))

    def forward(self, x: Tensor, train: bool) -> Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        x = self.crop(x, train)
        if train:
            x = self.augment(x)
        return self.standardize(x)
