"""The camera of a synthetic image: per-channel gain and background, sensor noise, 8-bit output."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hpa_lightning.data.simulator.scene import unit_noise


def expose(channels: Sequence[np.ndarray], out_rng: np.random.Generator, texture_noise: float) -> np.ndarray:
    """The RGBY float channels as uint8 ``(4, size, size)``: per-channel gain and background, sensor noise."""
    size = channels[0].shape[0]
    out = np.empty((4, size, size), dtype=np.uint8)
    gains = out_rng.uniform((0.45, 0.5, 0.55, 0.45), (0.9, 1.0, 1.0, 0.9))
    background = out_rng.uniform(0.5, 6.0, 4)
    for ch, img in enumerate(channels):
        v = img * np.float32(gains[ch] * 255.0 / (float(img.max()) + 1e-6)) + np.float32(background[ch])
        # Mild sensor noise: read noise plus a shot-noise-like term growing with the signal.
        v += unit_noise(out_rng, (size, size)) * (np.float32(0.4) + np.float32(0.25) * np.sqrt(v))
        if texture_noise > 0:
            v += np.float32(texture_noise) * (np.float32(10.0) + np.float32(8.0) * unit_noise(out_rng, (size, size)))
        out[ch] = np.clip(np.rint(v), 0, 255).astype(np.uint8)
    return out
