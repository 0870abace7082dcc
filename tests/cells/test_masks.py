"""Mask files as they circulate (uint16 PNG, int32 TIFF, npy, npz, 8-bit), read to one int32 label image; the
refusals name the file (another size than its image, no cell, pickles, huge headers)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpa_lightning.cells.masks import find_cell_mask, load_cell_mask, read_label_image, write_masks
from hpa_lightning.errors import DataError

LABELS = np.zeros((6, 9), dtype=np.int32)
LABELS[1:3, 1:4], LABELS[4:6, 5:9] = 1, 300


@pytest.mark.parametrize("form", ["png16", "tif32", "npy", "npz", "png8"])
def test_every_form_reads_to_the_same_int32_labels(tmp_path: Path, form: str) -> None:
    labels = LABELS if form != "png8" else np.minimum(LABELS, 200)
    path = tmp_path / f"x_cell_mask.{form[:3] if form not in ('tif32',) else 'tif'}"
    if form == "png16":
        Image.fromarray(labels.astype(np.uint16)).save(path)
    elif form == "tif32":
        Image.fromarray(labels.astype(np.int32)).save(path)
    elif form == "npy":
        np.save(path, labels)
    elif form == "npz":
        np.savez(path, mask=labels)
    else:
        Image.fromarray(labels.astype(np.uint8)).save(path)
    assert find_cell_mask(tmp_path, "x") == path
    got = load_cell_mask(tmp_path, "x", 6, 9)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, labels)


def test_written_masks_read_back(tmp_path: Path) -> None:
    cells, nuclei = write_masks(tmp_path, "a", LABELS, np.where(LABELS == 1, 1, 0))
    np.testing.assert_array_equal(read_label_image(cells), LABELS)
    assert read_label_image(nuclei).max() == 1


def test_another_size_than_its_image_and_no_cell_are_named(tmp_path: Path) -> None:
    Image.fromarray(LABELS.astype(np.uint16)).save(tmp_path / "a_cell_mask.png")
    with pytest.raises(DataError, match=r"a_cell_mask.png: the mask is 9x6 px but its image is 10x6 px"):
        load_cell_mask(tmp_path, "a", 6, 10)
    np.save(tmp_path / "b.npy", np.zeros((6, 9), np.int32))
    with pytest.raises(DataError, match=r"b.npy: the mask holds no cell"):
        load_cell_mask(tmp_path, "b", 6, 9)
    with pytest.raises(DataError, match="no cell mask for image c"):
        load_cell_mask(tmp_path, "c", 6, 9)


def test_a_pickle_bearing_npy_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "p.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="p.npy: cannot read the mask"):
        read_label_image(path)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_a_huge_header_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "h_cell_mask.png"
    path.write_bytes(_png_header(100000, 100000))
    with pytest.raises(DataError, match="h_cell_mask.png: cannot read the mask .*decompression bomb"):
        read_label_image(path)  # Pillow's own bound (179 Mpx) answers first
    path.write_bytes(_png_header(3000, 3000))
    with pytest.raises(DataError, match="h_cell_mask.png: 3000x3000 px is above the bound of 1000000 px"):
        read_label_image(path, max_pixels=1_000_000)
    np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(5000, 5000))
    with pytest.raises(DataError, match="big.npy: .* above the bound"):
        read_label_image(tmp_path / "big.npy", max_pixels=1000)
