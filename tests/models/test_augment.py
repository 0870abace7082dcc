"""Device-side augmentation: the 90-degree turns are uniform and exact, geometry is shared by the four channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hpa_lightning.models.augment import DeviceTransform, build_augmentation, check_crop


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


# ------------------------------------------------------------------------------ crops from a higher resolution


def window_of(crop: torch.Tensor, image: torch.Tensor) -> list[tuple[int, int]]:
    """Every (top, left) where `crop` is exactly a window of `image` (all four channels), by brute force."""
    size, full = crop.shape[-1], image.shape[-1]
    return [(t, left) for t in range(full - size + 1) for left in range(full - size + 1)
            if torch.equal(image[:, t:t + size, left:left + size], crop)]


def test_training_crops_are_random_windows_shared_by_the_channels() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 4, 20, 20)  # distinct values: a window is found at one place only
    transform = DeviceTransform([0.0] * 4, [1.0] * 4, augment=None, crop={"size": 12, "eval": "full"})
    out = transform(x, train=True)
    assert out.shape == (64, 4, 12, 12)
    corners = [window_of(out[i], x[i]) for i in range(64)]
    assert all(len(found) == 1 for found in corners)  # a plain window, the same for R, G, B and Y
    positions = {found[0] for found in corners}
    assert len(positions) > 20  # drawn per sample, over the 81 possible windows


def test_evaluation_sees_the_full_image_or_its_centre() -> None:
    x = torch.rand(3, 4, 21, 21)
    full = DeviceTransform([0.0] * 4, [1.0] * 4, crop={"size": 12, "eval": "full"})(x, train=False)
    torch.testing.assert_close(full, x, rtol=0, atol=0)
    centre = DeviceTransform([0.0] * 4, [1.0] * 4, crop={"size": 12, "eval": "center"})(x, train=False)
    torch.testing.assert_close(centre, x[..., 4:16, 4:16], rtol=0, atol=0)
    assert all(window_of(centre[i], x[i]) == [(4, 4)] for i in range(3))


def test_crop_settings_are_checked_in_one_line() -> None:
    assert check_crop(None) == (None, "full")
    for crop, image_size, message in [({"size": 4}, None, "crop.size=4: expected a whole number of pixels >= 8"),
                                      ({"size": 64}, 48, "crop.size=64 is larger than the packed images"),
                                      ({"size": 32, "eval": "middle"}, None, "crop.eval='middle': expected one of")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            check_crop(crop, image_size)
