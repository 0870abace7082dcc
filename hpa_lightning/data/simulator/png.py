"""A minimal 8-bit grayscale PNG encoder (zlib level 1: ~2.5x faster than PIL's default for ~10% larger files)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

_PNG_LEVEL = 1  # zlib level: ~2.5x faster than the default 6 for ~10% larger files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_gray8(a: np.ndarray) -> bytes:
    """Encode a uint8 2-D array as an 8-bit grayscale PNG (what Pillow reads as mode "L").

    Written by hand because encoding is a large share of generate() and Pillow's encoder (adaptive per-row filter
    search) took ~3x longer than filter type 0 plus fast zlib, for files no smaller on these noisy images.
    """
    h, w = a.shape
    rows = np.zeros((h, w + 1), dtype=np.uint8)  # leading 0 per row = filter type none
    rows[:, 1:] = a
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8 bit, grayscale, deflate, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), _PNG_LEVEL))
        + _png_chunk(b"IEND", b"")
    )
