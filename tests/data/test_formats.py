"""HPA images as people download them, made in the test from the generator's output: HPAv18 external data as
RGB-plane JPGs at a larger size, HPA 2021 / website 16-bit PNG and TIFF (full and low range), and the odd modes. Each
must pack to the store its 8-bit Kaggle PNG equivalent packs to (exactly, or within JPEG error)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpa_lightning.classes import CHANNELS
from hpa_lightning.data.sources import CHANNEL_PLANES, decode_channel
from hpa_lightning.data.store import build_store
from hpa_lightning.data.synth.dataset import generate
from hpa_lightning.errors import DataError

SIZE = 32


@pytest.fixture(scope="module")
def kaggle_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("gen") / "kaggle", n=12, seed=3, size=64, workers=1)


def convert(source: Path, out: Path, write) -> Path:
    """A copy of the Kaggle-layout `source` with every channel PNG rewritten by `write(array, channel, stem)`."""
    (out / "train").mkdir(parents=True)
    shutil.copy(source / "train.csv", out / "train.csv")
    for path in sorted((source / "train").glob("*.png")):
        sample_id, channel = path.stem.rsplit("_", 1)
        write(np.asarray(Image.open(path)), channel, out / "train" / f"{sample_id}_{channel}")
    return out


def rgb_plane_jpg(array: np.ndarray, channel: str, stem: Path) -> None:
    """HPAv18: the channel's signal in its own colour plane(s) of an RGB JPG, at 4x the size (2048 px vs 512)."""
    rgb = np.zeros((*array.shape, 3), dtype=np.uint8)
    for plane in CHANNEL_PLANES[channel]:
        rgb[..., plane] = array
    big = Image.fromarray(rgb, mode="RGB").resize((array.shape[1] * 4, array.shape[0] * 4), Image.Resampling.BICUBIC)
    big.save(stem.with_suffix(".jpg"), quality=95)


def sixteen_bit(suffix: str, scale: int = 257):
    def write(array: np.ndarray, channel: str, stem: Path) -> None:
        Image.fromarray(array.astype(np.uint16) * scale).save(stem.with_suffix(suffix))
    return write


def packed(root: Path, cache: Path, **kwargs) -> np.ndarray:
    return np.asarray(build_store(root, SIZE, cache, workers=1, **kwargs).images())


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_copies_pack_to_the_same_bytes(kaggle_png: Path, tmp_path: Path, suffix: str) -> None:
    root = convert(kaggle_png, tmp_path / "hpa16", sixteen_bit(suffix))
    assert Image.open(next((root / "train").glob(f"*{suffix}"))).mode.startswith("I;16")
    np.testing.assert_array_equal(packed(root, tmp_path / "c16"), packed(kaggle_png, tmp_path / "c8"))


def test_low_range_sixteen_bit_with_percentile_scaling(kaggle_png: Path, tmp_path: Path) -> None:
    root = convert(kaggle_png, tmp_path / "low", sixteen_bit(".png", scale=4))  # max 1020 of 65535
    dark = packed(root, tmp_path / "c")
    assert dark.max() <= 4  # `divide` (the exact rule for full-range data) leaves low-range data near black
    stretched = packed(root, tmp_path / "c", sixteen_bit="percentile")
    reference = packed(kaggle_png, tmp_path / "c8").astype(np.float64)
    assert stretched.max() > 200 and stretched.mean() > 20 * max(dark.mean(), 0.5)  # the full 8-bit range in use
    # each image is the same picture, linearly rescaled (up to the clipped top 0.1 % and rounding)
    correlations = [np.corrcoef(stretched[i, c].ravel(), reference[i, c].ravel())[0, 1]
                    for i in range(len(reference)) for c in range(len(CHANNELS)) if reference[i, c].std() > 0]
    assert np.median(correlations) > 0.99 and min(correlations) > 0.95, correlations


def test_hpav18_rgb_jpgs_pack_like_the_pngs_within_jpeg_error(kaggle_png: Path, tmp_path: Path) -> None:
    root = convert(kaggle_png, tmp_path / "hpav18", rgb_plane_jpg)
    difference = np.abs(packed(root, tmp_path / "cj").astype(int) - packed(kaggle_png, tmp_path / "c8").astype(int))
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 12, (difference.mean(), difference.max())


def test_an_rgb_composite_is_refused_as_one_line(kaggle_png: Path, tmp_path: Path) -> None:
    array = np.asarray(Image.open(next((kaggle_png / "train").glob("*_green.png"))))
    composite = tmp_path / "x_green.jpg"
    Image.fromarray(np.stack([array, array, array], axis=-1)).save(composite)  # every plane carries signal
    with pytest.raises(DataError) as raised:
        decode_channel(composite, "green")
    assert "an RGB composite, not a green channel file" in str(raised.value) and "\n" not in str(raised.value)


def test_other_modes_are_converted_or_refused(tmp_path: Path) -> None:
    grey = (np.arange(256, dtype=np.uint8).reshape(16, 16))
    Image.fromarray(grey).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(decode_channel(tmp_path / "la.png", "red"), grey)  # alpha dropped
    palette = Image.fromarray(np.stack([grey, np.zeros_like(grey), np.zeros_like(grey)], -1)).quantize(256)
    palette.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.abs(decode_channel(tmp_path / "p.png", "red").astype(int) - grey).max() <= 8  # palette -> its plane
    Image.fromarray(grey > 127).save(tmp_path / "mask.png")
    with pytest.raises(DataError, match=r"mask\.png: a 1-bit \(mask\) image"):
        decode_channel(tmp_path / "mask.png", "red")
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match=r"float\.tif: a floating-point image"):
        decode_channel(tmp_path / "float.tif", "red")


def test_the_hpa_2021_csv_is_recognised(tmp_path: Path) -> None:
    from hpa_lightning.data.sources import read_label_table

    csv = tmp_path / "train.csv"
    csv.write_text("ID,Label\n5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0,8|5|0\n5fb643ee-bb99-11e8-b2b9-ac1f6b6435d0,14|0\n")
    with pytest.raises(DataError) as raised:
        read_label_table(csv)
    assert str(raised.value).startswith(f"{csv}: an HPA 2021 CSV") and "data=hpa2021" in str(raised.value)
    assert "\n" not in str(raised.value)
