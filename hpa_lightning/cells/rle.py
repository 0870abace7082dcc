"""Cell masks as the HPA 2021 competition's strings: COCO RLE of the Fortran-ordered mask, zlib level 9, base64.

This is the competition's published encoder: `pycocotools.mask.encode` of the (H, W, 1) uint8 Fortran-ordered mask,
its `counts` bytes compressed with `zlib.compress(counts, 9)`, then base64 as ASCII. Decoding reverses it to an
(H, W) bool mask. A mask string does not hold its size: the submission row's ImageHeight x ImageWidth gives it.

pycocotools does the run-length coding both ways. Only the check before decoding is written here
(`counts_total`): pycocotools' C decoder trusts the counts string, writing runs past the end of its H*W buffer when
they add up to more (memory corruption, not an error) and leaving the tail undefined when they add up to less, and it
accepts bytes outside the format's alphabet. Compare decoded masks in tests, never the strings: zlib builds may
compress the same bytes differently.
"""

from __future__ import annotations

import base64
import binascii
import zlib

import numpy as np
from pycocotools import mask as coco_mask

from hpa_lightning.errors import DataError


def rle_counts(mask: np.ndarray) -> bytes:
    """The COCO RLE `counts` of a binary (H, W) mask, exactly as pycocotools encodes it (column-major runs)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a cell mask is (H, W); got shape {mask.shape}")
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)[:, :, None]))[0]["counts"]


def encode_mask(mask: np.ndarray) -> str:
    """A binary (H, W) mask as the competition's string (ASCII base64 of the zlib-compressed RLE counts)."""
    return base64.b64encode(zlib.compress(rle_counts(mask), zlib.Z_BEST_COMPRESSION)).decode("ascii")


def max_counts_bytes(pixels: int) -> int:
    """The longest RLE counts of a mask of `pixels` pixels: at most pixels + 1 runs, each at most 7 five-bit groups."""
    return 7 * (pixels + 1)


def mask_counts(text: str, pixels: int | None = None) -> bytes:
    """The RLE counts inside a mask string; `DataError` (no location: the caller adds it) if it is not one. With
    `pixels` (the image's H x W), a string that decompresses to more than any mask of that size could hold is refused
    before it is inflated further: a few kB of zlib can expand to gigabytes, and submissions come from others."""
    try:
        compressed = base64.b64decode(text.encode("ascii"), validate=True)
        if pixels is None:
            return zlib.decompress(compressed)
        inflater = zlib.decompressobj()
        limit = max_counts_bytes(pixels)
        counts = inflater.decompress(compressed, limit + 1)
    except (binascii.Error, zlib.error, UnicodeEncodeError, ValueError):
        raise DataError(f"mask {_short(text)} is not base64 of zlib-compressed RLE counts") from None
    if len(counts) > limit or inflater.unconsumed_tail:
        raise DataError(f"mask {_short(text)} inflates to more than {limit} bytes, more than the RLE counts of any "
                        f"mask of {pixels} pixels")
    if not inflater.eof:
        raise DataError(f"mask {_short(text)} is not base64 of zlib-compressed RLE counts (the stream is cut short)")
    return counts


def counts_total(counts: bytes) -> int:
    """The number of pixels COCO RLE `counts` cover, read as pycocotools' rleFrString reads them.

    Each count is a little-endian run of 5-bit groups (byte - 48; 0x20 = more groups follow, 0x10 in the last group =
    negative), and counts from the fourth on are stored as the difference to the count two before. `DataError` for a
    byte outside the alphabet, a count cut short, or a negative run: what pycocotools would decode into garbage.
    """
    runs: list[int] = []
    value = shift = 0
    for byte in counts:
        group = byte - 48
        if not 0 <= group < 64:
            raise DataError(f"RLE counts hold the byte {byte!r}, outside the COCO alphabet ('0'..'o')")
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:  # sign-extend the last group
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise DataError(f"RLE counts hold a negative run ({value}) at run {len(runs) + 1}")
        runs.append(value)
        value = shift = 0
    if shift:
        raise DataError("RLE counts end inside a run (the last byte says more follow)")
    return sum(runs)


def rle_of(text: str, height: int, width: int) -> dict[str, object]:
    """The pycocotools RLE object of a mask string for an image of `height` x `width`, checked to cover exactly that
    many pixels (`DataError` otherwise): safe to hand to `pycocotools.mask.decode`, `area` or `iou`."""
    counts = mask_counts(text, height * width)
    total = counts_total(counts)
    if total != height * width:
        raise DataError(f"mask {_short(text)} covers {total} pixels, not ImageHeight x ImageWidth = {height} x {width}"
                        f" = {height * width}")
    return {"size": [height, width], "counts": counts}


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    """The (height, width) bool mask of a competition mask string; `DataError` if it is not one of that size."""
    return coco_mask.decode(rle_of(text, height, width)).astype(bool)


def _short(text: str) -> str:
    return repr(text if len(text) <= 24 else text[:21] + "...")
