"""The same image in two sources (HPAv18 holds thousands of Kaggle 2018 images, re-encoded as RGB JPGs at 4x the
size): found by a perceptual hash of the green (protein) channel, as the 2018 winners did.

`imagehash.phash` (DCT-based, 64 bits) survives resizing and JPEG re-encoding with a few flipped bits. Candidate pairs
come from locality-sensitive bands: split into `max_distance + 1` bands, two hashes within `max_distance` bits of each
other agree on at least one band (pigeonhole), so every such pair is found without comparing all pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DUPLICATE_POLICIES = ("drop", "keep", "error")


def green_hash(sample: np.ndarray) -> int:
    """64-bit perceptual hash of the green channel of a (4, S, S) RGBY sample."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(np.ascontiguousarray(sample[1]))).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


@dataclass(frozen=True)
class DuplicatePair:
    first: int   # row of the earlier source's sample (kept by `drop`)
    second: int  # row of the later source's sample
    distance: int  # differing hash bits


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of `max_distance + 1` nearly equal bit bands covering 64 bits."""
    count = max_distance + 1
    edges = np.linspace(0, 64, count + 1).round().astype(int)
    return [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def find_duplicates(hashes: list[int | None], sources: np.ndarray, max_distance: int = 3) -> list[DuplicatePair]:
    """Pairs of rows from different sources whose hashes differ in at most `max_distance` bits (rows with hash None,
    e.g. unreadable samples, take no part). Each later row is paired with its first match only."""
    if not 0 <= max_distance < 32:
        raise ValueError(f"max_distance={max_distance}: expected 0..31")
    rows = [row for row, h in enumerate(hashes) if h is not None]
    found: dict[int, DuplicatePair] = {}
    for shift, mask in _bands(max_distance):
        buckets: dict[int, list[int]] = {}
        for row in rows:
            buckets.setdefault((hashes[row] >> shift) & mask, []).append(row)
        for members in buckets.values():
            for a_pos, a in enumerate(members):
                for b in members[a_pos + 1:]:
                    first, second = (a, b) if sources[a] <= sources[b] else (b, a)
                    if sources[first] == sources[second] or second in found:
                        continue
                    distance = (hashes[first] ^ hashes[second]).bit_count()
                    if distance <= max_distance:
                        found[second] = DuplicatePair(first, second, distance)
    return sorted(found.values(), key=lambda pair: pair.second)
