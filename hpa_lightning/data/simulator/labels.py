"""Labels and ids of a synthetic dataset: Kaggle 2018 class frequencies, every class present once n >= 200."""

from __future__ import annotations

import uuid
from functools import lru_cache

import numpy as np

from hpa_lightning.classes import KAGGLE_TRAIN_COUNTS, KAGGLE_TRAIN_SAMPLES, NUM_CLASSES

# Independent random streams of one dataset seed: SeedSequence(seed, spawn_key=(stream, ...)); PATTERN_STREAM picks
# the 2018 pattern drawing each merged hpa2021 class (single_cell.hpa2021_patterns).
LABEL_STREAM, ID_STREAM, RENDER_STREAM, PATTERN_STREAM = 0, 1, 2, 3


_PRIOR = np.asarray(KAGGLE_TRAIN_COUNTS, dtype=np.float64) / KAGGLE_TRAIN_SAMPLES


_MIN_PER_CLASS = 2  # every class in >= 2 samples once n >= _COVERAGE_MIN_N, so a small set has all patterns


_COVERAGE_MIN_N = 200


@lru_cache(maxsize=1)
def _bernoulli_scale() -> float:
    """alpha with alpha * p_c + P(no label) * p_c / sum(p) == p_c.

    Samples draw each class independently with probability alpha * p_c; an empty draw gets one class drawn
    from p / sum(p). With this alpha the top-up keeps every marginal at exactly p_c (and the mean label count at
    sum(p) = 1.63). f(alpha) below is non-decreasing, so bisection finds the root.
    """
    total = float(_PRIOR.sum())
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mid + float(np.prod(1.0 - mid * _PRIOR)) / total < 1.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def sample_labels(n: int, rng: np.random.Generator) -> list[list[int]]:
    """Draw ``n`` label sets with Kaggle HPA 2018 class frequencies, >= 1 label each, in random order like Kaggle.

    For ``n >= 200`` every class is present in at least 2 samples (rare classes are topped up), which raises the
    rarest marginals slightly above their Kaggle values for small ``n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    onehot = rng.random((n, NUM_CLASSES)) < _bernoulli_scale() * _PRIOR
    empty = np.flatnonzero(~onehot.any(axis=1))
    onehot[empty, rng.choice(NUM_CLASSES, size=empty.size, p=_PRIOR / _PRIOR.sum())] = True
    if n >= _COVERAGE_MIN_N:
        for c in range(NUM_CLASSES):
            missing = _MIN_PER_CLASS - int(onehot[:, c].sum())
            if missing > 0:
                onehot[rng.choice(np.flatnonzero(~onehot[:, c]), size=missing, replace=False), c] = True
    order = np.argsort(rng.random((n, NUM_CLASSES)), axis=1)
    return [[int(c) for c in row[onehot[i, row]]] for i, row in enumerate(order)]


def make_ids(n: int, rng: np.random.Generator) -> list[str]:
    """Unique ids shaped like Kaggle's (version-1 UUIDs from 2018: ``xxxxxxxx-xxxx-11e8-xxxx-xxxxxxxxxxxx``)."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        k = n - len(ids)
        low = rng.integers(0, 2**32, size=k, dtype=np.uint64)
        mid = rng.integers(0, 2**16, size=k)
        clock = rng.integers(0, 2**14, size=k) | 0x8000  # RFC 4122 variant bits, as in the real ids
        node = rng.integers(0, 2**48, size=k, dtype=np.uint64)
        for a, b, c, d in zip(low.tolist(), mid.tolist(), clock.tolist(), node.tolist(), strict=True):
            s = str(uuid.UUID(fields=(a, b, 0x11E8, c >> 8, c & 0xFF, d)))
            if s not in seen:
                seen.add(s)
                ids.append(s)
    return ids
