"""Device-side augmentation: the 90-degree turns are uniform and exact, geometry is shared by the four channels."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import chisquare

from hpa_lightning.models.augment import build_augmentation


def marked_batch(n: int, size: int = 8) -> torch.Tensor:
    x = torch.zeros(n, 4, size, size)
    x[:, :, 0, 0] = 1.0  # one bright corner: where it ends up tells the rotation
    return x


def turns_applied(out: torch.Tensor) -> np.ndarray:
    """0/1/2/3 quarter turns (counter-clockwise, torch.rot90's sense) from the marker's corner; -1 if none."""
    size = out.shape[-1] - 1
    corners = {(0, 0): 0, (size, 0): 1, (size, size): 2, (0, size): 3}
    result = np.full(len(out), -1)
    for (row, col), k in corners.items():
        result[(out[:, :, row, col] == 1.0).all(dim=1).numpy()] = k
    return result


def test_quarter_turns_are_uniform_and_exact() -> None:
    torch.manual_seed(0)
    augment = build_augmentation(rot90=True, rotation_degrees=0, hflip=0, vflip=0, brightness=0, contrast=0)
    x = marked_batch(4000)
    out = augment(x)
    turns = turns_applied(out)
    assert (turns >= 0).all()  # an exact permutation of the pixels: the marker stays 1.0 in a corner, all channels
    assert out.sum().item() == x.sum().item()
    counts = np.bincount(turns, minlength=4)
    # kornia's RandomRotation90(times=(0, 3)) gives about 667/1333/1333/667 here: p < 1e-100
    assert chisquare(counts).pvalue > 1e-3, counts
    assert counts.min() > 850, counts
