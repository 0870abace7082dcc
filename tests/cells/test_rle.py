"""Competition mask strings: exact round trips on 200 random masks, the counts pycocotools makes, the known vector.

Oracles from outside the module: pycocotools' own compression of run lengths counted here with numpy
(`frPyObjects` on uncompressed RLE), and the counts `b'5220003'` that pycocotools 2.0 gives the 4x5 mask with rows 1-2
and columns 1-3 set (/work/shared/NOTES.md, 2026-12-06). Strings are compared decoded, never compressed.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from hpa_lightning.cells.rle import counts_total, decode_mask, encode_mask, max_counts_bytes, rle_counts, rle_of
from hpa_lightning.errors import DataError


def random_masks(count: int, seed: int = 0) -> list[np.ndarray]:
    """Empty, full, non-square, touching an edge, random blobs and noise, 1..40 pixels a side."""
    rng = np.random.default_rng(seed)
    masks = [np.zeros((1, 1), bool), np.ones((1, 1), bool), np.zeros((3, 7), bool), np.ones((7, 3), bool)]
    while len(masks) < count:
        height, width = (int(v) for v in rng.integers(1, 41, size=2))
        kind = len(masks) % 5
        mask = np.zeros((height, width), bool)
        if kind == 0:  # blobs: unions of discs
            yy, xx = np.mgrid[:height, :width]
            for _ in range(int(rng.integers(1, 4))):
                cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(1, max(height, width) / 2)
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif kind == 1:  # touching an edge: a border band plus a rectangle reaching the opposite corner
            mask[int(rng.integers(0, height)):, -1] = True
            mask[0, : int(rng.integers(1, width + 1))] = True
            mask[int(rng.integers(0, height)):, int(rng.integers(0, width)):] = True
        elif kind == 2:  # noise
            mask = rng.random((height, width)) < rng.uniform(0.05, 0.95)
        elif kind == 3:
            mask[:] = bool(rng.integers(0, 2))  # empty or full
        else:  # one row or column
            mask[:, int(rng.integers(0, width))] = True
        masks.append(mask)
    return masks


def runs_column_major(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counted here: column-major runs, starting with zeros (0 if the first pixel is set)."""
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


MASKS = random_masks(200)


def test_200_random_masks_round_trip_exactly() -> None:
    for mask in MASKS:
        text = encode_mask(mask)
        assert text.isascii()
        decoded = decode_mask(text, *mask.shape)
        assert decoded.dtype == bool and decoded.shape == mask.shape
        np.testing.assert_array_equal(decoded, mask)


def test_counts_before_zlib_are_pycocotools_own() -> None:
    for mask in MASKS:
        counts = zlib.decompress(base64.b64decode(encode_mask(mask)))
        assert counts == rle_counts(mask)
        assert counts == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]  # the 2-D call
        uncompressed = {"size": list(mask.shape), "counts": runs_column_major(mask)}
        assert counts == coco_mask.frPyObjects(uncompressed, *mask.shape)["counts"]
        assert counts_total(counts) == mask.size


def test_the_known_vector() -> None:
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    assert rle_counts(mask) == b"5220003"
    text = base64.b64encode(zlib.compress(b"5220003", 9)).decode()
    np.testing.assert_array_equal(decode_mask(text, 4, 5), mask)
    np.testing.assert_array_equal(decode_mask(encode_mask(mask), 4, 5), mask)


def _text(counts: bytes) -> str:
    return base64.b64encode(zlib.compress(counts)).decode()


@pytest.mark.parametrize(("text", "message"), [
    (_text(b"5220003"), "covers 20 pixels, not ImageHeight x ImageWidth = 5 x 5 = 25"),
    ("not base64!", "is not base64 of zlib-compressed RLE counts"),
    (base64.b64encode(b"plain, not zlib").decode(), "is not base64 of zlib-compressed RLE counts"),
    (_text(b"52 0003"), "outside the COCO alphabet"),
    (_text(b"522000h"), "end inside a run"),
    (_text(b"522@003"), "negative run"),
])
def test_a_bad_mask_string_is_one_line(text: str, message: str) -> None:
    with pytest.raises(DataError) as err:
        decode_mask(text, 5, 5)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_zlib_bomb_is_refused_before_it_is_inflated() -> None:
    """A 50 kB mask string that inflates to 50 MB (a truth or prediction file comes from someone else): refused
    after inflating at most the longest counts a mask of the row's size can have."""
    bomb = base64.b64encode(zlib.compress(b"1" * 50_000_000, 9)).decode("ascii")
    assert len(bomb) < 100_000
    with pytest.raises(DataError, match=f"inflates to more than {max_counts_bytes(20)} bytes"):
        rle_of(bomb, 4, 5)
    truncated = base64.b64encode(zlib.compress(rle_counts(np.ones((4, 5), bool)), 9)[:-3]).decode("ascii")
    with pytest.raises(DataError, match="cut short"):
        rle_of(truncated, 4, 5)
