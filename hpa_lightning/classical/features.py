"""Image features of the baselines: per-channel statistics over a grid of the standardised image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hpa_lightning.classes import CHANNELS


@dataclass(frozen=True)
class FeatureSpec:
    grid: int = 8
    intensity_stats: bool = False
    percentiles: tuple[float, ...] = (1, 5, 25, 50, 75, 95, 99)
    chunk: int = 512

    def n_features(self, channels: int = len(CHANNELS)) -> int:
        return channels * (self.grid * self.grid + (2 + len(self.percentiles) if self.intensity_stats else 0))

    def names(self, channels: Sequence[str] = CHANNELS) -> list[str]:
        """Column names in the order `extract_features` writes them."""
        out = [f"{ch}_r{r}c{c}" for ch in channels for r in range(self.grid) for c in range(self.grid)]
        if self.intensity_stats:
            stats = ["mean", "std", *(f"p{q:g}" for q in self.percentiles)]
            out += [f"{ch}_{s}" for ch in channels for s in stats]
        return out


def area_weights(size: int, grid: int) -> np.ndarray:
    """(grid, size) matrix averaging `size` pixels into `grid` equal cells by area.

    Cell i covers [i * size / grid, (i + 1) * size / grid); a pixel straddling a border contributes to both cells in
    proportion to its overlap (PIL's BOX / OpenCV's INTER_AREA downsampling). Every row sums to 1, so
    `W @ image @ W.T` is the mean of each cell; with `size % grid == 0` it is the plain block mean.
    """
    if not 1 <= grid <= size:
        raise ValueError(f"grid={grid} must be in [1, {size}]")
    edges = np.arange(grid + 1, dtype=np.float64) * (size / grid)
    left = np.arange(size, dtype=np.float64)
    overlap = np.minimum(left[None, :] + 1, edges[1:, None]) - np.maximum(left[None, :], edges[:-1, None])
    return (np.clip(overlap, 0.0, None) * (grid / size)).astype(np.float32)


def extract_features(images: np.ndarray, rows: np.ndarray, mean: Sequence[float], std: Sequence[float],
                     spec: FeatureSpec = FeatureSpec()) -> np.ndarray:
    """float32 features ``(len(rows), n_features)`` of `images[rows]` (uint8 ``(N, C, S, S)``, usually a memory map).

    Per chunk of `spec.chunk` rows (read in ascending row order, written back in the order of `rows`): each channel
    area-averaged to ``grid x grid`` cells, in [0, 1] units, standardised with the per-channel `mean`/`std`
    (train statistics in [0, 1] units); with `intensity_stats` also each channel's mean and percentiles
    (standardised the same way) and std (divided by the channel std). Peak extra memory is about one chunk as
    float32; nothing of the dataset is held beyond the float32 output.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be (N, C, S, S), got shape {images.shape}")
    if spec.chunk < 1:
        raise ValueError(f"chunk={spec.chunk} must be >= 1")
    channels, size = images.shape[1], images.shape[2]
    weights = area_weights(size, spec.grid)
    mu = np.asarray(mean, dtype=np.float32).reshape(1, channels, 1)
    sigma = np.asarray(std, dtype=np.float32).reshape(1, channels, 1)
    percentiles = np.asarray(spec.percentiles, dtype=np.float64)
    out = np.empty((len(rows), spec.n_features(channels)), dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    for start in range(0, len(rows), spec.chunk):
        positions = order[start:start + spec.chunk]
        raw = images[rows[positions]]  # uint8 (B, C, S, S), one sequential read
        pixels = raw.astype(np.float32)
        pooled = (weights @ pixels @ weights.T).reshape(len(positions), channels, -1) / 255.0
        parts = [((pooled - mu) / sigma).reshape(len(positions), -1)]
        if spec.intensity_stats:
            flat = pixels.reshape(len(positions), channels, -1)
            levels = [flat.mean(axis=-1, keepdims=True)]  # (B, C, 1) each, in [0, 255]
            spread = flat.std(axis=-1, keepdims=True) / 255.0
            if len(percentiles):
                quantiles = np.percentile(raw.reshape(len(positions), channels, -1), percentiles, axis=-1)
                levels.append(np.moveaxis(quantiles, 0, -1))  # (B, C, P)
            level = (np.concatenate(levels, axis=-1) / 255.0 - mu) / sigma
            stats = np.concatenate([level[..., :1], spread / sigma, level[..., 1:]], axis=-1)  # mean, std, p...
            parts.append(stats.reshape(len(positions), -1))
        out[positions] = np.concatenate(parts, axis=1)
    return out
