"""Synthetic Human Protein Atlas 2018 data in the Kaggle layout (``train.csv`` + ``train/{Id}_{channel}.png``).

Labels follow the Kaggle per-class frequencies. Images are a few cells with landmark channels (blue nuclei,
red microtubules, yellow ER) and a green protein channel whose pattern is drawn from the labels *relative to
those landmarks*, so a model has to read green against the other channels.

CLI: ``python -m hpa_lightning.synth out=DIR n=500 seed=0 size=128 [texture_noise=0.0] [zoom=1.0] [workers=N]``
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from hpa_lightning.classes import CHANNELS, KAGGLE_TRAIN_COUNTS, KAGGLE_TRAIN_SAMPLES, NUM_CLASSES
from hpa_lightning.files import remove_stale_temporaries, temporary_sibling
from hpa_lightning.resources import available_cpus

__all__ = ["generate", "main", "render_sample", "sample_labels"]

# Independent random streams of one dataset seed: SeedSequence(seed, spawn_key=(stream, ...)).
_LABEL_STREAM, _ID_STREAM, _RENDER_STREAM = 0, 1, 2
_PRIOR = np.asarray(KAGGLE_TRAIN_COUNTS, dtype=np.float64) / KAGGLE_TRAIN_SAMPLES
_MIN_PER_CLASS = 2  # every class in >= 2 samples once n >= _COVERAGE_MIN_N, so a small set has all patterns
_COVERAGE_MIN_N = 200
_BASE = 128.0  # geometry below is specified in pixels of a 128 px image and scaled by size / _BASE
_MITOTIC, _BRIDGE = 17, 16
_STEP = 1.0  # sampling step of drawn lines (px at 128); dense enough for sigma >= 0.6 px after splatting
_TIP_POINTS = 4  # points of a microtubule end drawn as a comet
_PNG_LEVEL = 1  # zlib level: ~2.5x faster than the default 6 for ~10% larger files

# --------------------------------------------------------------------------------------------------- labels


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


def _make_ids(n: int, rng: np.random.Generator) -> list[str]:
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


# ------------------------------------------------------------------------------------------ image primitives


@lru_cache(maxsize=256)
def _kernel(sigma: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Half of a normalised Gaussian kernel (k[0] = centre) and, per position, the weight that falls inside."""
    r = min(max(1, math.ceil(3.0 * sigma)), length - 1)
    k = np.exp(-0.5 * (np.arange(r + 1) / sigma) ** 2)
    k /= k[0] + 2.0 * k[1:].sum()
    inside = np.full(length, k[0])
    for j in range(1, r + 1):
        inside[j:] += k[j]
        inside[:-j] += k[j]
    return k.astype(np.float32), inside.astype(np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur as sums of shifted row blocks; faster than BLAS or FFT for these small kernels.

    Each pass works along axis 0 (contiguous slices) and transposes. Taps falling outside the image are dropped and
    the rest renormalised, so borders do not darken.
    """
    sigma = round(float(sigma), 3)
    out = img
    for _ in range(2):
        k, inside = _kernel(sigma, out.shape[0])
        acc = out * k[0]
        tmp = np.empty_like(acc)
        for j in range(1, k.size):
            n = out.shape[0] - j
            np.multiply(out[:-j], k[j], out=tmp[:n])
            acc[j:] += tmp[:n]
            np.multiply(out[j:], k[j], out=tmp[:n])
            acc[:-j] += tmp[:n]
        acc /= inside[:, None]
        out = np.ascontiguousarray(acc.T)
    return out


def _splat(ys: np.ndarray, xs: np.ndarray, ws: np.ndarray, size: int) -> np.ndarray:
    """Bilinear point splatting (sub-pixel positions) via bincount."""
    y0, x0 = np.floor(ys), np.floor(xs)
    fy, fx = ys - y0, xs - x0
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    acc = np.zeros(size * size, dtype=np.float64)
    for oy, wy in ((0, 1.0 - fy), (1, fy)):
        for ox, wx in ((0, 1.0 - fx), (1, fx)):
            yy, xx = y0 + oy, x0 + ox
            ok = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
            acc += np.bincount((yy * size + xx)[ok], weights=(ws * wy * wx)[ok], minlength=size * size)
    return acc.reshape(size, size).astype(np.float32)


class _Canvas:
    """One channel: a dense field plus points grouped by blur width, so each width costs a single blur."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.field = np.zeros((size, size), dtype=np.float32)
        self._points: dict[float, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}

    def _add(self, ys: np.ndarray, xs: np.ndarray, ws: np.ndarray | float, sigma: float) -> None:
        arrays = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (ys, xs, ws)))
        self._points.setdefault(round(sigma, 3), []).append(tuple(a.ravel() for a in arrays))  # type: ignore[arg-type]

    def dots(self, ys: np.ndarray, xs: np.ndarray, w: np.ndarray | float, sigma: float) -> None:
        """Gaussian dots of peak height ~w."""
        self._add(ys, xs, np.asarray(w, dtype=np.float64) * (2.0 * math.pi * sigma**2), sigma)

    def path(self, ys: np.ndarray, xs: np.ndarray, w: np.ndarray | float, sigma: float, step: float) -> None:
        """Lines sampled every ``step`` px, ridge height ~w."""
        self._add(ys, xs, np.asarray(w, dtype=np.float64) * (step * math.sqrt(2.0 * math.pi) * sigma), sigma)

    def render(self) -> np.ndarray:
        out = self.field.copy()
        for sigma, items in self._points.items():
            ys = np.concatenate([i[0] for i in items])
            xs = np.concatenate([i[1] for i in items])
            ws = np.concatenate([i[2] for i in items])
            out += _blur(_splat(ys, xs, ws, self.size), sigma)
        return out


# ---------------------------------------------------------------------------------------------------- scene


@dataclass
class _Cell:
    cy: float
    cx: float
    a: float  # semi-axis along `angle`
    b: float
    angle: float
    wobble: tuple[float, float, float, float]  # 2nd/3rd angular harmonics of the outline
    ny: float  # nucleus centre / semi-axes / angle (for mitotic cells: the metaphase plate)
    nx: float
    na: float
    nb: float
    nangle: float
    kind: str  # "interphase" | "mitotic" | "daughter"
    mtoc: tuple[float, float] = (0.0, 0.0)  # (y, x): microtubule organising centre, Golgi / aggresome side
    poles: tuple[tuple[float, float], ...] = ()  # spindle poles of a mitotic cell
    nucleoli: list[tuple[float, float, float]] = field(default_factory=list)  # (y, x, radius)
    bridge: tuple[float, float, float] | None = None  # (y, x, angle) of a cytokinetic bridge owned by this cell


@dataclass
class _Scene:
    size: int
    unit: float
    rng: np.random.Generator
    cells: list[_Cell]
    Y: np.ndarray
    X: np.ndarray
    owner: np.ndarray  # int, cell index per pixel, -1 = background
    rho: np.ndarray  # normalised radius in the owning cell (< 1 inside)
    nrho: np.ndarray  # normalised radius w.r.t. the owning cell's nucleus (< 1 inside)
    region: np.ndarray  # 0 background, 1 cytoplasm, 2 nucleoplasm, 3 nucleolus
    cell_soft: np.ndarray
    nuc_soft: np.ndarray
    cyto_soft: np.ndarray
    nucleoli: np.ndarray  # soft nucleolus field
    mitotic_px: np.ndarray  # pixels of mitotic cells (nuclear envelope / nucleoli absent there)
    er: np.ndarray = field(init=False)  # landmark fields reused by green patterns (ER = class 6, MT = class 14)
    mt: np.ndarray = field(init=False)
    mt_tips: np.ndarray = field(init=False)  # (k, T, 2) last few points of every microtubule ending at a membrane
    spindles: list[tuple[np.ndarray, np.ndarray]] = field(init=False)  # (ys, xs) paths per mitotic cell
    _noise: dict[float, np.ndarray] = field(init=False, default_factory=dict)

    def noise(self, sigma: float) -> np.ndarray:
        """Smooth unit-variance noise, cached per width so patterns sharing a texture draw it once."""
        if sigma not in self._noise:
            n = _blur(_unit_noise(self.rng, (self.size, self.size)), sigma * self.unit)
            self._noise[sigma] = n / (n.std() + 1e-6)
        return self._noise[sigma]

    def gain_map(self, gains: np.ndarray) -> np.ndarray:
        return np.where(self.owner >= 0, gains[np.maximum(self.owner, 0)], 0.0).astype(np.float32)

    def lookup(self, arr: np.ndarray, ys: np.ndarray, xs: np.ndarray, outside: int | float) -> np.ndarray:
        yi, xi = np.rint(ys).astype(np.int64), np.rint(xs).astype(np.int64)
        ok = (yi >= 0) & (yi < self.size) & (xi >= 0) & (xi < self.size)
        out = np.full(yi.shape, outside, dtype=arr.dtype)
        out[ok] = arr[yi[ok], xi[ok]]
        return out

    def sample_points(
        self, i: int, k: int, regions: tuple[int, ...] = (1,), peri: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to k random points of cell i in the given regions; ``peri`` biases them towards the nucleus."""
        c, rng = self.cells[i], self.rng
        m = 6 * k + 24
        r = np.sqrt(rng.random(m)) * 1.1
        phi = rng.random(m) * 2.0 * math.pi
        u, v = r * c.a * np.cos(phi), r * c.b * np.sin(phi)
        ca, sa = math.cos(c.angle), math.sin(c.angle)
        ys, xs = c.cy + u * sa + v * ca, c.cx + u * ca - v * sa
        ok = (self.lookup(self.owner, ys, xs, -1) == i) & np.isin(self.lookup(self.region, ys, xs, 0), regions)
        accept = rng.random(m)
        if peri is not None:
            ok &= accept < np.exp(-np.maximum(self.lookup(self.nrho, ys, xs, 9.0) - 1.0, 0.0) / peri)
        idx = np.flatnonzero(ok)[:k]
        return ys[idx], xs[idx]


def _window(c: _Cell, size: int) -> tuple[slice, slice]:
    """Bounding box of a cell; wobble is clipped to |sum| <= 0.28 so the outline stays within 1.3 semi-axes."""
    r = 1.3 * max(c.a, c.b) + 2.0
    return (
        slice(max(0, int(c.cy - r)), min(size, int(c.cy + r) + 2)),
        slice(max(0, int(c.cx - r)), min(size, int(c.cx + r) + 2)),
    )


def _unit_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean unit-variance uniform noise: ~4x cheaper than normal draws and looks the same as pixel noise."""
    return (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(math.sqrt(12.0))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _ellipse_rho(
    Y: np.ndarray,
    X: np.ndarray,
    cy: float,
    cx: float,
    a: float,
    b: float,
    angle: float,
    wobble: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Normalised elliptical radius (1 on the outline); harmonics in cos/sin of the angle avoid arctan2."""
    dy, dx = Y - np.float32(cy), X - np.float32(cx)
    ca, sa = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u, v = dx * ca + dy * sa, dy * ca - dx * sa
    rho = np.sqrt((u / np.float32(a)) ** 2 + (v / np.float32(b)) ** 2)
    if wobble is not None:
        r = np.sqrt(u * u + v * v) + np.float32(1e-3)
        c, s = u / r, v / r
        w = np.float32(1.0)
        for coef, harm in zip(
            wobble, (c * c - s * s, 2 * c * s, c * (4 * c * c - 3), s * (3 - 4 * s * s)), strict=True
        ):
            w = w + np.float32(coef) * harm
        rho = rho / w
    return rho


def _ellipse_radius(a: float, b: float, angle: float, direction: float) -> float:
    t = direction - angle
    return 1.0 / math.sqrt((math.cos(t) / a) ** 2 + (math.sin(t) / b) ** 2)


def _new_cell(y: float, x: float, r0: float, kind: str, rng: np.random.Generator, u: float) -> _Cell:
    if kind == "interphase":
        aspect = rng.uniform(1.0, 1.6)
        a, b = r0 * math.sqrt(aspect), r0 / math.sqrt(aspect)
        wobble = tuple(np.clip(rng.normal(0.0, 0.05, 4), -0.07, 0.07).tolist())
    else:  # mitotic cells round up; daughters are small and round
        aspect = rng.uniform(1.0, 1.15)
        a, b = r0 * math.sqrt(aspect), r0 / math.sqrt(aspect)
        wobble = tuple(np.clip(rng.normal(0.0, 0.02, 4), -0.05, 0.05).tolist())
    angle = rng.uniform(0.0, math.pi)
    cell = _Cell(y, x, a, b, angle, wobble, y, x, 1.0, 1.0, angle, kind)
    if kind == "mitotic":
        cell.nangle = rng.uniform(0.0, math.pi)
        cell.na, cell.nb = 0.5 * r0, max(0.13 * r0, 1.5 * u)
        axis = cell.nangle + math.pi / 2
        pole = 0.58 * r0
        cell.poles = tuple((y + s * pole * math.sin(axis), x + s * pole * math.cos(axis)) for s in (-1.0, 1.0))
        cell.mtoc = cell.poles[0]
        return cell
    ca, sa = math.cos(angle), math.sin(angle)
    off_u, off_v = rng.uniform(-0.12, 0.12) * a, rng.uniform(-0.12, 0.12) * b
    cell.ny, cell.nx = y + off_u * sa + off_v * ca, x + off_u * ca - off_v * sa
    scale = (0.42, 0.52) if kind == "interphase" else (0.42, 0.48)
    cell.na, cell.nb = rng.uniform(*scale) * a, rng.uniform(*scale) * b
    cell.nangle = angle + rng.normal(0.0, 0.25)
    psi = rng.uniform(0.0, 2.0 * math.pi)
    dist = _ellipse_radius(cell.na, cell.nb, cell.nangle, psi) + 2.5 * u
    cell.mtoc = (cell.ny + dist * math.sin(psi), cell.nx + dist * math.cos(psi))
    n_nucleoli = int(rng.integers(1, 5)) if kind == "interphase" else int(rng.integers(0, 2))
    for _ in range(n_nucleoli):
        rr, ph = rng.uniform(0.0, 0.55), rng.uniform(0.0, 2.0 * math.pi)
        nu, nv = rr * cell.na * math.cos(ph), rr * cell.nb * math.sin(ph)
        cn, sn = math.cos(cell.nangle), math.sin(cell.nangle)
        radius = max(rng.uniform(0.15, 0.24) * min(cell.na, cell.nb), 1.2 * u)
        cell.nucleoli.append((cell.ny + nu * sn + nv * cn, cell.nx + nu * cn - nv * sn, radius))
    return cell


def _layout(size: int, rng: np.random.Generator, mitotic: bool, dividing: bool, zoom: float = 1.0) -> list[_Cell]:
    """A few touching cells: each new cell is placed next to an existing one so that cell contacts exist."""
    u = size * zoom / _BASE
    target = int(rng.integers(3, 7))
    # The first cell always fits, so every image has an interphase cell for the interphase-only patterns.
    plan = ["interphase"] + (["mitotic"] if mitotic else []) + (["pair"] if dividing else [])
    plan += ["interphase"] * max(0, target - len(plan) - dividing)
    cells: list[_Cell] = []
    discs: list[tuple[float, float, float]] = []

    def place(r: float) -> tuple[float, float] | None:
        for _ in range(40):
            if not discs:
                y, x = rng.uniform(0.3, 0.7, 2) * size
            else:
                oy, ox, orad = discs[int(rng.integers(len(discs)))]
                phi, d = rng.uniform(0.0, 2.0 * math.pi), (orad + r) * rng.uniform(0.8, 1.0)
                y, x = oy + d * math.sin(phi), ox + d * math.cos(phi)
            if not (0.04 * size <= y <= 0.96 * size and 0.04 * size <= x <= 0.96 * size):
                continue
            if all(math.hypot(y - py, x - px) >= 0.75 * (r + pr) for py, px, pr in discs):
                return y, x
        return None

    for kind in plan:
        r0 = rng.uniform(22.0, 32.0) * u
        if kind == "mitotic":
            r0 *= 0.8
        elif kind == "pair":
            r0 *= 0.62
        pos = place(r0)
        if pos is None:
            continue
        if kind != "pair":
            cells.append(_new_cell(pos[0], pos[1], r0, kind, rng, u))
            discs.append((pos[0], pos[1], r0))
            continue
        # Daughters are placed as one unit along an axis; the bridge crosses their contact line. If no direction
        # keeps the second daughter's centre in the image, the last try stands (that cell is cut by the border).
        for _ in range(40):
            phi = rng.uniform(0.0, 2.0 * math.pi)
            d = 2.0 * r0 * 0.9
            y2, x2 = pos[0] + d * math.sin(phi), pos[1] + d * math.cos(phi)
            if 0.04 * size <= y2 <= 0.96 * size and 0.04 * size <= x2 <= 0.96 * size:
                break
        first = _new_cell(pos[0], pos[1], r0, "daughter", rng, u)
        second = _new_cell(y2, x2, r0, "daughter", rng, u)
        first.bridge = (0.5 * (pos[0] + y2), 0.5 * (pos[1] + x2), phi)
        cells += [first, second]
        discs += [(pos[0], pos[1], r0), (y2, x2, r0)]
    return cells


def _build_scene(size: int, rng: np.random.Generator, mitotic: bool, dividing: bool, zoom: float = 1.0) -> _Scene:
    u = size * zoom / _BASE
    cells = _layout(size, rng, mitotic, dividing, zoom)
    Y, X = _grid(size)
    rho = np.full((size, size), 9.0, dtype=np.float32)
    nrho = np.full((size, size), 9.0, dtype=np.float32)
    owner = np.full((size, size), -1, dtype=np.int16)
    for j, c in enumerate(cells):
        wy, wx = _window(c, size)
        r = _ellipse_rho(Y[wy, wx], X[wy, wx], c.cy, c.cx, c.a, c.b, c.angle, c.wobble)
        # Overlapping cells are split by the smaller normalised radius, which gives straight-ish contact lines.
        closer = r < rho[wy, wx]
        rho[wy, wx][closer] = r[closer]
        owner[wy, wx][closer] = j
        nrho[wy, wx][closer] = _ellipse_rho(Y[wy, wx], X[wy, wx], c.ny, c.nx, c.na, c.nb, c.nangle)[closer]
    inside = rho < 1.0
    owner[~inside] = -1
    nrho[~inside] = 9.0
    cell_soft = np.clip((1.0 - rho) / np.float32(0.05), 0.0, 1.0) * inside
    nuc_soft = np.clip((1.0 - nrho) / np.float32(0.12), 0.0, 1.0) * inside
    nucleoli = np.zeros((size, size), dtype=np.float32)
    for c in cells:
        for ny, nx, r in c.nucleoli:
            y0, y1 = max(0, int(ny - r - 2)), min(size, int(ny + r + 3))
            x0, x1 = max(0, int(nx - r - 2)), min(size, int(nx + r + 3))
            d = np.sqrt((Y[y0:y1, x0:x1] - ny) ** 2 + (X[y0:y1, x0:x1] - nx) ** 2)
            blob = np.clip((1.0 - d / np.float32(r)) / np.float32(0.35), 0.0, 1.0)
            np.maximum(nucleoli[y0:y1, x0:x1], blob, out=nucleoli[y0:y1, x0:x1])
    nucleoli *= nuc_soft
    region = np.zeros((size, size), dtype=np.int8)
    region[inside] = 1
    region[inside & (nrho < 1.0)] = 2
    region[nucleoli > 0.5] = 3
    is_mitotic = np.array([c.kind == "mitotic" for c in cells])
    return _Scene(
        size=size,
        unit=u,
        rng=rng,
        cells=cells,
        Y=Y,
        X=X,
        owner=owner,
        rho=rho,
        nrho=nrho,
        region=region,
        cell_soft=cell_soft.astype(np.float32),
        nuc_soft=nuc_soft.astype(np.float32),
        cyto_soft=np.clip(cell_soft - nuc_soft, 0.0, 1.0).astype(np.float32),
        nucleoli=nucleoli,
        mitotic_px=inside & is_mitotic[np.maximum(owner, 0)],
    )


# ------------------------------------------------------------------------------------------ landmark channels


def _segment(p: tuple[float, float], q: tuple[float, float], step: float) -> tuple[np.ndarray, np.ndarray]:
    m = max(2, int(math.hypot(q[0] - p[0], q[1] - p[1]) / step) + 1)
    t = np.linspace(0.0, 1.0, m)
    return p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])


def _walks(
    y0: np.ndarray,
    x0: np.ndarray,
    theta0: np.ndarray,
    steps: int,
    step: float,
    curl: np.ndarray,
    jitter: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random walks (k, steps): constant curvature ``curl`` (rad/px) plus heading noise (rad/sqrt(px))."""
    k = theta0.shape[0]
    # uniform noise: a fraction of the cost of normal draws, and after cumsum the heading is Gaussian anyway
    kicks = (rng.random((k, steps), dtype=np.float32) - np.float32(0.5)) * np.float32(jitter * math.sqrt(12 * step))
    heading = (theta0[:, None] + curl[:, None] * (np.arange(steps) * step)).astype(np.float32)
    heading += np.cumsum(kicks, axis=1)
    ys = y0[:, None] + np.cumsum(np.sin(heading) * np.float32(step), axis=1)
    xs = x0[:, None] + np.cumsum(np.cos(heading) * np.float32(step), axis=1)
    return ys, xs


def _spindle(c: _Cell, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Fibres from both poles to points along the metaphase plate."""
    t = np.linspace(-0.9, 0.9, 9) * c.na
    qy, qx = c.ny + t * math.sin(c.nangle), c.nx + t * math.cos(c.nangle)
    s = np.linspace(0.0, 1.0, max(2, int(0.8 * c.a / step)))[None, :]
    ys_l, xs_l = [], []
    for py, px in c.poles:
        ys_l.append(py + s * (qy[:, None] - py))
        xs_l.append(px + s * (qx[:, None] - px))
    return np.concatenate(ys_l).ravel(), np.concatenate(xs_l).ravel()


def _microtubules(sc: _Scene) -> np.ndarray:
    """Red: filaments radiating from each MTOC to the membrane; spindles in mitotic cells; bridges in daughters."""
    rng, u = sc.rng, sc.unit
    cv = _Canvas(sc.size)
    step = _STEP * u
    sc.spindles = []
    origin_y, origin_x, cell_of, lengths, angles = [], [], [], [], []
    for i, c in enumerate(sc.cells):
        if c.kind == "mitotic":
            ys, xs = _spindle(c, step)
            sc.spindles.append((ys, xs))
            cv.path(ys, xs, 0.8, 0.7 * u, step)
            k, length = 20, 0.3 * c.a  # short astral rays around both poles
            origin_y.append(np.repeat([p[0] for p in c.poles], k // 2))
            origin_x.append(np.repeat([p[1] for p in c.poles], k // 2))
        else:
            k = int(rng.integers(48, 64)) if c.kind == "interphase" else int(rng.integers(28, 40))
            length = 1.6 * max(c.a, c.b)
            origin_y.append(np.full(k, c.mtoc[0]))
            origin_x.append(np.full(k, c.mtoc[1]))
        cell_of.append(np.full(k, i))
        lengths.append(np.full(k, length))
        # stratified directions: an even aster instead of random clumps of rays
        angles.append((np.arange(k) + rng.random(k)) * (2.0 * math.pi / k) + rng.uniform(0.0, 2.0 * math.pi))
        if c.bridge is not None:
            by, bx, phi = c.bridge
            h = 0.45 * c.a
            ys, xs = _segment(
                (by - h * math.sin(phi), bx - h * math.cos(phi)), (by + h * math.sin(phi), bx + h * math.cos(phi)), step
            )
            cv.path(ys, xs, 1.2, 0.8 * u, step)
    # All filaments of the image in one batch of walks; each is cut where it first leaves its cell.
    ray_cell, ray_len = np.concatenate(cell_of), np.concatenate(lengths)
    k = ray_cell.size
    steps = int(ray_len.max() / step) + 1
    ys, xs = _walks(
        np.concatenate(origin_y),
        np.concatenate(origin_x),
        np.concatenate(angles),
        steps,
        step,
        rng.normal(0.0, 0.025 / u, k),
        0.04,
        rng,
    )
    own = sc.lookup(sc.owner, ys, xs, -2)  # -2: outside the image, where a cell cut by the border goes on
    within = np.arange(steps) * step < ray_len[:, None]
    keep = np.cumprod(((own == ray_cell[:, None]) | (own == -2)) & within, axis=1).astype(bool)
    n_in = keep.sum(axis=1)
    exit_at = np.minimum(n_in, steps - 1)
    interphase = np.array([c.kind != "mitotic" for c in sc.cells])[ray_cell]
    # a tip at the membrane: stopped by leaving its cell inside the image, not by its length, after a minimal length
    ends = interphase & (n_in < steps) & within[np.arange(k), exit_at] & (n_in > 4 / _STEP)
    back = np.clip(n_in[ends, None] - 1 - np.arange(_TIP_POINTS)[None, :], 0, steps - 1)
    tip_rows = np.flatnonzero(ends)[:, None]
    sc.mt_tips = np.stack([ys[tip_rows, back], xs[tip_rows, back]], axis=-1)
    weight = np.where(sc.lookup(sc.region, ys, xs, 0) >= 2, 0.35, 1.0) * rng.uniform(0.3, 0.7, (k, 1))
    cv.path(ys[keep], xs[keep], weight[keep], 0.6 * u, step)
    red = cv.render()
    # Saturating response keeps filaments visible instead of everything but the MTOC hot spot going dark.
    red = red / (red + np.float32(0.7)) + 0.12 * sc.cyto_soft + 0.05 * sc.nuc_soft
    sc.mt = red
    return red


def _bump(x: np.ndarray, width: float) -> np.ndarray:
    """1 / (1 + (x / width)^4): a Gaussian-like bump, several times cheaper than exp on full images."""
    q = x * np.float32(1.0 / width)
    q *= q
    return np.float32(1.0) / (np.float32(1.0) + q * q)


def _reticulum(sc: _Scene) -> np.ndarray:
    """Yellow: a reticular network (zero crossings of band-passed noise), densest around the nucleus."""
    u = sc.unit
    raw = sc.rng.random((sc.size, sc.size), dtype=np.float32)
    band = _blur(raw, 1.1 * u) - _blur(raw, 2.8 * u)
    band /= band.std() + 1e-6
    net = _bump(band, 0.45)
    d = np.maximum(sc.nrho - 1.0, 0.0) * np.float32(1.0 / 0.6)
    peri = np.float32(1.0) / (np.float32(1.0) + d * d)
    peri = np.where(sc.mitotic_px, np.float32(0.6), peri)  # ER disperses in mitosis
    envelope = _bump(sc.nrho - 1.0, 0.12) * ~sc.mitotic_px
    er = sc.cyto_soft * (0.25 + 0.75 * peri) * (0.2 + 0.8 * net) + 0.35 * envelope * sc.cell_soft
    sc.er = er.astype(np.float32)
    return sc.er


def _nuclei(sc: _Scene) -> np.ndarray:
    """Blue: filled nuclei with chromatin texture and darker nucleoli; condensed plates are brighter."""
    chromatin = sc.noise(0.8)
    blue = sc.nuc_soft * (0.72 + 0.12 * chromatin) * (1.0 - 0.55 * sc.nucleoli)
    return np.where(sc.mitotic_px, sc.nuc_soft * 1.25, blue)


# -------------------------------------------------------------------------------------- green (protein) patterns

_Pattern = Callable[[_Scene, _Canvas, np.ndarray], None]


def _each_cell(sc: _Scene, kinds: tuple[str, ...] = ("interphase", "daughter", "mitotic")) -> list[tuple[int, _Cell]]:
    return [(i, c) for i, c in enumerate(sc.cells) if c.kind in kinds]


def _count(sc: _Scene, c: _Cell, lo: int, hi: int) -> int:
    """Object counts scale with cell area relative to a typical interphase cell (radius 27 px at 128)."""
    area = c.a * c.b / (27.0 * sc.unit) ** 2
    return max(1, int(round(sc.rng.integers(lo, hi + 1) * area)))


def _g_nucleoplasm(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    cv.field += sc.gain_map(g) * sc.nuc_soft * (1.0 - sc.nucleoli) * (0.85 + 0.1 * sc.noise(0.8))


def _g_nuclear_membrane(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    ring = _bump(sc.nrho - 1.0, 0.1) * ~sc.mitotic_px
    cv.field += sc.gain_map(g) * ring * sc.cell_soft


def _g_nucleoli(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    cv.field += sc.gain_map(g) * sc.nucleoli


def _g_fibrillar_center(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    for i, c in _each_cell(sc):
        for ny, nx, r in c.nucleoli:
            k = int(rng.integers(2, 6))
            rr, ph = np.sqrt(rng.random(k)) * 0.6 * r, rng.random(k) * 2.0 * math.pi
            cv.dots(ny + rr * np.sin(ph), nx + rr * np.cos(ph), g[i] * rng.uniform(0.7, 1.0, k), 0.55 * u)
    cv.field += 0.12 * sc.gain_map(g) * sc.nucleoli


def _g_speckles(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    for i, c in _each_cell(sc):
        ys, xs = sc.sample_points(i, _count(sc, c, 14, 26), regions=(2,))
        cv.dots(ys, xs, g[i] * sc.rng.uniform(0.5, 1.0, ys.size), 0.9 * sc.unit)
    cv.field += 0.15 * sc.gain_map(g) * sc.nuc_soft * (1.0 - sc.nucleoli)


def _g_nuclear_bodies(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    for i, _c in _each_cell(sc):
        ys, xs = sc.sample_points(i, int(sc.rng.integers(1, 4)), regions=(2,))
        cv.dots(ys, xs, g[i], 1.3 * sc.unit)


def _g_er(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    cv.field += sc.gain_map(g) * sc.er / (sc.er.max() + 1e-6)


def _g_golgi(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    blobs = sc.noise(1.2)
    for i, c in _each_cell(sc, ("interphase", "daughter")):
        wy, wx = _window(c, sc.size)
        dy, dx = sc.Y[wy, wx] - c.ny, sc.X[wy, wx] - c.nx
        my, mx = c.mtoc[0] - c.ny, c.mtoc[1] - c.nx
        cos_ang = (dy * my + dx * mx) / (np.sqrt(dy * dy + dx * dx) * math.hypot(my, mx) + 1e-6)
        nr = sc.nrho[wy, wx]
        crescent = np.exp(-(((nr - 1.3) / np.float32(0.22)) ** 2)) * np.clip((cos_ang - 0.3) / 0.4, 0.0, 1.0)
        texture = np.clip(0.55 + 0.45 * blobs[wy, wx], 0.1, 1.0)
        cv.field[wy, wx] += g[i] * crescent * texture * (sc.owner[wy, wx] == i) * (sc.region[wy, wx] == 1)


def _dots_in_cytoplasm(lo: int, hi: int, sigma: float, peri: float | None, wmin: float = 0.7) -> _Pattern:
    def pattern(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
        for i, c in _each_cell(sc):
            ys, xs = sc.sample_points(i, _count(sc, c, lo, hi), peri=peri)
            cv.dots(ys, xs, g[i] * sc.rng.uniform(wmin, 1.0, ys.size), sigma * sc.unit)

    return pattern


def _g_intermediate_filaments(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    step = _STEP * u
    for i, c in _each_cell(sc, ("interphase", "daughter")):
        k = _count(sc, c, 8, 13)
        ys0, xs0 = sc.sample_points(i, k, peri=0.4)
        k = ys0.size
        radial = np.arctan2(ys0 - c.ny, xs0 - c.nx)
        theta = radial + np.where(rng.random(k) < 0.5, 1.0, -1.0) * (math.pi / 2) + rng.normal(0.0, 0.4, k)
        steps = int(rng.uniform(1.0, 1.6) * max(c.a, c.b) / step)
        ys, xs = _walks(ys0, xs0, theta, steps, step, rng.normal(0.0, 0.03 / u, k), 0.0, rng)
        # waviness: a sinusoidal sideways displacement on top of the smooth path
        t = np.arange(steps) * step
        wave = 0.9 * u * np.sin(t[None, :] / (2.2 * u) + rng.uniform(0, 2 * math.pi, (k, 1)))
        ys, xs = ys + wave * np.cos(theta)[:, None], xs - wave * np.sin(theta)[:, None]
        keep = np.cumprod(sc.lookup(sc.owner, ys, xs, -1) == i, axis=1).astype(bool)
        w = np.where(sc.lookup(sc.region, ys, xs, 0) >= 2, 0.45, 1.0) * g[i]
        cv.path(ys[keep], xs[keep], w[keep], 0.65 * u, step)


def _g_actin(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    step = _STEP * u
    for i, c in _each_cell(sc, ("interphase", "daughter")):
        beta = c.angle + rng.normal(0.0, 0.25)
        k = int(rng.integers(6, 11))
        span = max(c.a, c.b) * 1.2
        offsets = np.linspace(-0.8, 0.8, k) * min(c.a, c.b) + rng.normal(0.0, 0.8 * u, k)
        t = np.arange(-span, span, step)
        sb, cb = math.sin(beta), math.cos(beta)
        ys = c.cy + offsets[:, None] * cb + t[None, :] * sb
        xs = c.cx - offsets[:, None] * sb + t[None, :] * cb
        keep = sc.lookup(sc.owner, ys, xs, -1) == i
        w = np.where(sc.lookup(sc.region, ys, xs, 0) >= 2, 0.6, 1.0) * g[i] * rng.uniform(0.6, 1.0, (k, 1))
        cv.path(ys[keep], xs[keep], w[keep], 0.6 * u, step)
    cortex = np.exp(-(((sc.rho - 0.95) / np.float32(0.05)) ** 2)) * (sc.owner >= 0)
    cv.field += 0.3 * sc.gain_map(g) * cortex


def _g_focal_adhesions(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    step = _STEP * u
    for i, c in _each_cell(sc, ("interphase", "daughter")):
        k = _count(sc, c, 10, 18)
        phi = rng.uniform(0.0, 2.0 * math.pi, k)
        rr = rng.uniform(0.78, 0.92, k)
        uu, vv = rr * c.a * np.cos(phi), rr * c.b * np.sin(phi)
        ca, sa = math.cos(c.angle), math.sin(c.angle)
        y0, x0 = c.cy + uu * sa + vv * ca, c.cx + uu * ca - vv * sa
        heading = np.arctan2(y0 - c.cy, x0 - c.cx)
        t = np.arange(-1.8 * u, 1.8 * u + 1e-6, step)
        ys, xs = y0[:, None] + np.sin(heading)[:, None] * t, x0[:, None] + np.cos(heading)[:, None] * t
        keep = sc.lookup(sc.owner, ys, xs, -1) == i
        cv.path(ys[keep], xs[keep], g[i], 0.7 * u, step)


def _g_microtubules(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    cv.field += sc.gain_map(g) * sc.mt


def _g_microtubule_ends(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    if sc.mt_tips.size:
        ys, xs = sc.mt_tips[..., 0], sc.mt_tips[..., 1]
        owner = np.maximum(sc.lookup(sc.owner, ys[:, 0], xs[:, 0], 0), 0)
        fade = np.linspace(1.0, 0.3, ys.shape[1])[None, :]  # comet: bright at the tip, fading backwards
        cv.path(ys, xs, g[owner][:, None] * fade, 0.8 * sc.unit, _STEP * sc.unit)


def _g_cytokinetic_bridge(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    u = sc.unit
    for i, c in _each_cell(sc, ("daughter",)):
        if c.bridge is None:
            continue
        by, bx, phi = c.bridge
        h = 0.35 * c.a
        ys, xs = _segment(
            (by - h * math.sin(phi), bx - h * math.cos(phi)),
            (by + h * math.sin(phi), bx + h * math.cos(phi)),
            _STEP * u,
        )
        cv.path(ys, xs, g[i] * 0.8, 0.9 * u, _STEP * u)
        cv.dots(np.array([by]), np.array([bx]), g[i], 1.4 * u)


def _g_mitotic_spindle(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    mitotic = _each_cell(sc, ("mitotic",))
    for (i, c), (ys, xs) in zip(mitotic, sc.spindles, strict=True):
        cv.path(ys, xs, g[i] * 0.6, 0.8 * sc.unit, _STEP * sc.unit)
        cv.dots(np.array([p[0] for p in c.poles]), np.array([p[1] for p in c.poles]), g[i], 1.1 * sc.unit)


def _centrosomes(c: _Cell) -> list[tuple[float, float]]:
    return list(c.poles) if c.kind == "mitotic" else [c.mtoc]


def _g_mtoc(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    for i, c in _each_cell(sc):
        pts = np.array(_centrosomes(c))
        cv.dots(pts[:, 0], pts[:, 1], g[i], 1.2 * sc.unit)


def _g_centrosome(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    u = sc.unit
    for i, c in _each_cell(sc):
        for y, x in _centrosomes(c):
            phi = sc.rng.uniform(0.0, 2.0 * math.pi)
            off = np.array([-1.0, 1.0]) * 1.6 * u
            cv.dots(y + off * math.sin(phi), x + off * math.cos(phi), g[i], 0.7 * u)


def _g_lipid_droplets(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    u = sc.unit
    ring = np.linspace(0.0, 2.0 * math.pi, 20, endpoint=False)
    for i, c in _each_cell(sc):
        ys, xs = sc.sample_points(i, _count(sc, c, 4, 9))
        r = sc.rng.uniform(1.6, 2.6, ys.size)[:, None] * u
        cv.path(ys[:, None] + r * np.sin(ring), xs[:, None] + r * np.cos(ring), g[i], 0.5 * u, (2 * math.pi / 20) * r)


def _edges(owner: np.ndarray, contacts_only: bool) -> np.ndarray:
    e = np.zeros(owner.shape, dtype=bool)
    for a, b in ((owner[:-1], owner[1:]), (owner[:, :-1], owner[:, 1:])):
        diff = a != b
        if contacts_only:
            diff &= (a >= 0) & (b >= 0)
        e[: a.shape[0], : a.shape[1]] |= diff & (a >= 0)
        e[owner.shape[0] - b.shape[0] :, owner.shape[1] - b.shape[1] :] |= diff & (b >= 0)
    return e


def _g_plasma_membrane(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    line = _blur(_edges(sc.owner, False).astype(np.float32), 0.6 * sc.unit)
    cv.field += sc.gain_map(g) * line / (line.max() + 1e-6) + 0.08 * sc.gain_map(g) * sc.cyto_soft


def _g_cell_junctions(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    line = _blur(_edges(sc.owner, True).astype(np.float32), 1.0 * sc.unit)
    cv.field += sc.gain_map(g) * line / (line.max() + 1e-6)


def _g_mitochondria(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    step = _STEP * u
    for i, c in _each_cell(sc):
        ys0, xs0 = sc.sample_points(i, _count(sc, c, 30, 50), peri=1.0)
        k = ys0.size
        ys, xs = _walks(
            ys0,
            xs0,
            rng.uniform(0, 2 * math.pi, k),
            int(rng.integers(4, 8)),
            step,
            rng.normal(0.0, 0.15 / u, k),
            0.17,
            rng,
        )
        keep = (sc.lookup(sc.owner, ys, xs, -1) == i) & (sc.lookup(sc.region, ys, xs, 0) == 1)
        w = g[i] * rng.uniform(0.6, 1.0, (k, 1)) * np.ones_like(ys)
        cv.path(ys[keep], xs[keep], w[keep], 0.6 * u, step)


def _g_aggresome(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    cells = _each_cell(sc, ("interphase", "daughter"))
    chosen = [cc for cc in cells if rng.random() < 0.7] or cells[:1]
    for i, c in chosen:
        dy, dx = c.mtoc[0] - c.ny, c.mtoc[1] - c.nx
        norm = math.hypot(dy, dx) + 1e-6
        y, x = c.mtoc[0] + 1.5 * u * dy / norm, c.mtoc[1] + 1.5 * u * dx / norm
        cv.dots(y + rng.normal(0.0, 1.2 * u, 3), x + rng.normal(0.0, 1.2 * u, 3), g[i] * 0.7, 2.3 * u)


def _g_cytosol(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    cv.field += sc.gain_map(g) * sc.cyto_soft * (0.85 + 0.1 * sc.noise(1.5))


def _g_cytoplasmic_bodies(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    u = sc.unit
    for i, _c in _each_cell(sc):
        ys, xs = sc.sample_points(i, int(sc.rng.integers(1, 4)))
        for y, x, r in zip(ys, xs, sc.rng.uniform(2.0, 2.8, ys.size) * u, strict=True):
            y0, y1 = max(0, int(y - r - 2)), min(sc.size, int(y + r + 3))
            x0, x1 = max(0, int(x - r - 2)), min(sc.size, int(x + r + 3))
            d = np.sqrt((sc.Y[y0:y1, x0:x1] - y) ** 2 + (sc.X[y0:y1, x0:x1] - x) ** 2)
            cv.field[y0:y1, x0:x1] += g[i] * np.clip(r + 0.5 - d, 0.0, 1.0)


def _g_rods_rings(sc: _Scene, cv: _Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    step = _STEP * u
    ring = np.linspace(0.0, 2.0 * math.pi, 16, endpoint=False)
    for i, _c in _each_cell(sc):
        ys, xs = sc.sample_points(i, int(rng.integers(2, 5)))
        is_ring = rng.random(ys.size) < 0.4
        for y, x, circ in zip(ys, xs, is_ring, strict=True):
            if circ:
                r = 1.8 * u
                cv.path(y + r * np.sin(ring), x + r * np.cos(ring), g[i], 0.55 * u, 2 * math.pi * r / 16)
            else:
                phi, h = rng.uniform(0, math.pi), rng.uniform(2.5, 3.5) * u
                ry, rx = _segment(
                    (y - h * math.sin(phi), x - h * math.cos(phi)), (y + h * math.sin(phi), x + h * math.cos(phi)), step
                )
                cv.path(ry, rx, g[i], 0.6 * u, step)


_GREEN: dict[int, _Pattern] = {
    0: _g_nucleoplasm,
    1: _g_nuclear_membrane,
    2: _g_nucleoli,
    3: _g_fibrillar_center,
    4: _g_speckles,
    5: _g_nuclear_bodies,
    6: _g_er,
    7: _g_golgi,
    8: _dots_in_cytoplasm(25, 45, 0.55, None, wmin=0.8),  # peroxisomes: many tiny, uniform
    9: _dots_in_cytoplasm(12, 22, 1.0, 0.8, wmin=0.5),  # endosomes: medium, variable, somewhat perinuclear
    10: _dots_in_cytoplasm(6, 12, 1.6, 0.45),  # lysosomes: fewer, larger, clustered round the nucleus
    11: _g_intermediate_filaments,
    12: _g_actin,
    13: _g_focal_adhesions,
    14: _g_microtubules,
    15: _g_microtubule_ends,
    16: _g_cytokinetic_bridge,
    17: _g_mitotic_spindle,
    18: _g_mtoc,
    19: _g_centrosome,
    20: _g_lipid_droplets,
    21: _g_plasma_membrane,
    22: _g_cell_junctions,
    23: _g_mitochondria,
    24: _g_aggresome,
    25: _g_cytosol,
    26: _g_cytoplasmic_bodies,
    27: _g_rods_rings,
}
assert sorted(_GREEN) == list(range(NUM_CLASSES)), "every class needs a green pattern"


# ---------------------------------------------------------------------------------------------------- render


def render_sample(
    labels: Sequence[int], size: int, rng: np.random.Generator, *, texture_noise: float = 0.0, zoom: float = 1.0
) -> np.ndarray:
    """Render one RGBY sample as uint8 ``(4, size, size)`` in channel order red, green, blue, yellow.

    ``zoom`` is the magnification: cells and structures are ``zoom`` times larger (and fewer fit the image), so
    small images still show the fine patterns (dots, rings) a 128 px image shows at zoom 1.

    Only classes 16 / 17 (dividing / mitotic cells) change the landmark channels: for the same rng state, two label
    sets without them give byte-identical red, blue and yellow channels and differ in green only.
    """
    labels = sorted({int(c) for c in labels})
    if any(not 0 <= c < NUM_CLASSES for c in labels):
        raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}, got {labels}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    # Dividing / mitotic cells also appear in unlabelled images so blue / red alone do not reveal classes 16 / 17.
    mitotic = bool(rng.random() < 0.12) or _MITOTIC in labels
    dividing = bool(rng.random() < 0.12) or _BRIDGE in labels
    sc = _build_scene(size, rng, mitotic, dividing, zoom)
    red = _microtubules(sc)
    yellow = _reticulum(sc)
    blue = _nuclei(sc)
    # cell-to-cell brightness differences of the stains
    red, blue, yellow = (ch * sc.gain_map(rng.uniform(0.7, 1.0, len(sc.cells))) for ch in (red, blue, yellow))
    # Separate streams for green and for the sensor model, so labels do not shift the landmark channels' noise.
    green_rng, out_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=2).tolist())
    sc.rng = green_rng
    cv = _Canvas(size)
    for c in labels:
        strength = green_rng.uniform(0.5, 1.0)
        _GREEN[c](sc, cv, (strength * green_rng.uniform(0.6, 1.0, len(sc.cells))).astype(np.float32))
    green = cv.render()
    out = np.empty((4, size, size), dtype=np.uint8)
    gains = out_rng.uniform((0.45, 0.5, 0.55, 0.45), (0.9, 1.0, 1.0, 0.9))
    background = out_rng.uniform(0.5, 6.0, 4)
    for ch, img in enumerate((red, green, blue, yellow)):
        v = img * np.float32(gains[ch] * 255.0 / (float(img.max()) + 1e-6)) + np.float32(background[ch])
        # Mild sensor noise: read noise plus a shot-noise-like term growing with the signal.
        v += _unit_noise(out_rng, (size, size)) * (np.float32(0.4) + np.float32(0.25) * np.sqrt(v))
        if texture_noise > 0:
            v += np.float32(texture_noise) * (np.float32(10.0) + np.float32(8.0) * _unit_noise(out_rng, (size, size)))
        out[ch] = np.clip(np.rint(v), 0, 255).astype(np.uint8)
    return out


# -------------------------------------------------------------------------------------------------- dataset


def _plan(n: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """Labels and ids of a dataset; cheap, so every worker recomputes them instead of receiving them."""
    labels = sample_labels(n, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_LABEL_STREAM,))))
    ids = _make_ids(n, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_ID_STREAM,))))
    return labels, ids


def _render_range(
    train_dir: str, n: int, seed: int, size: int, texture_noise: float, start: int, step: int, parent: int = 0,
    zoom: float = 1.0
) -> None:
    """Render samples start, start + step, ...; each from its own (seed, index) stream: any split, same bytes."""
    labels, ids = _plan(n, seed)
    for index in range(start, n, step):
        if parent and os.getppid() != parent:
            return  # generate() was killed without cleanup: stop rather than fill an abandoned folder
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_RENDER_STREAM, index)))
        img = render_sample(labels[index], size, rng, texture_noise=texture_noise, zoom=zoom)
        for ch, name in enumerate(CHANNELS):
            with open(os.path.join(train_dir, f"{ids[index]}_{name}.png"), "wb") as fh:
                fh.write(_png_gray8(img[ch]))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_gray8(a: np.ndarray) -> bytes:
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


def _worker_main(spec: str) -> None:
    _render_range(**json.loads(spec))


def _run_workers(train_dir: Path, n: int, seed: int, size: int, texture_noise: float, workers: int,
                 zoom: float = 1.0) -> None:
    """Render in ``workers`` fresh interpreters.

    Plain subprocesses rather than multiprocessing: fork is unsafe once the caller runs threads (Lightning, torch),
    and spawn re-imports the caller's ``__main__``, which breaks scripts without a ``__name__`` guard.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
    )
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"  # one single-threaded process per core
    code = "import sys; from hpa_lightning.synth import _worker_main; _worker_main(sys.argv[1])"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for w in range(workers):
            spec = dict(train_dir=str(train_dir), n=n, seed=seed, size=size, texture_noise=texture_noise, start=w,
                        zoom=zoom)
            spec.update(step=workers, parent=os.getpid())
            procs.append(
                subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], env=env, stdout=subprocess.DEVNULL)
            )
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                raise RuntimeError(
                    f"synth: a worker process exited with code {max(codes, key=abs)} (traceback on stderr)"
                )
            if all(c == 0 for c in codes):
                break
            time.sleep(0.05)
    finally:
        for p in procs:  # live workers here mean failure or interruption: stop them before the folder is removed
            if p.poll() is None:
                p.kill()
                p.wait()


def generate(
    out: str | Path,
    n: int,
    seed: int = 0,
    size: int = 128,
    workers: int | None = None,
    texture_noise: float = 0.0,
    zoom: float = 1.0,
) -> Path:
    """Write ``n`` samples in the Kaggle HPA 2018 layout to ``out`` and return it.

    Output is byte-identical for a given (n, seed, size, texture_noise) whatever ``workers`` is (default: the CPUs
    available; each worker is a fresh interpreter). The data are written to a sibling ``<out>.tmp-<host>-<pid>``
    folder that is renamed to ``out`` only once complete; ``out`` must not exist (FileExistsError).
    """
    root = Path(out)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if not 0.0 <= texture_noise <= 1.0:
        raise ValueError(f"texture_noise must be in [0, 1], got {texture_noise}")
    if not 0.25 <= zoom <= 8.0:
        raise ValueError(f"zoom must be in [0.25, 8], got {zoom}")
    workers = available_cpus() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if root.exists():
        raise FileExistsError(f"{root} already exists; synth never overwrites, remove it or pick another out=")
    root.parent.mkdir(parents=True, exist_ok=True)
    absolute = Path(os.path.abspath(root))  # normalises "." and trailing slashes before taking the name
    remove_stale_temporaries(absolute)
    tmp = temporary_sibling(absolute, unique=False)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier process that had our pid
    train_dir = tmp / "train"
    train_dir.mkdir(parents=True)
    try:
        labels, ids = _plan(n, seed)
        workers = min(workers, n)
        if workers == 1:
            _render_range(str(train_dir), n, seed, size, texture_noise, start=0, step=1, zoom=zoom)
        else:
            _run_workers(train_dir, n, seed, size, texture_noise, workers, zoom)
        with open(tmp / "train.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["Id", "Target"])
            for sample_id, lab in sorted(zip(ids, labels, strict=True)):  # Kaggle's train.csv is sorted by Id
                writer.writerow([sample_id, " ".join(map(str, lab))])
        if root.exists():
            raise FileExistsError(f"{root} appeared while generating; synth never overwrites")
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# ------------------------------------------------------------------------------------------------------- CLI

_CLI_TYPES: dict[str, Callable[[str], object]] = {
    "out": str,
    "n": int,
    "seed": int,
    "size": int,
    "workers": int,
    "texture_noise": float,
    "zoom": float,
}


_USAGE = ("usage: python -m hpa_lightning.synth out=DIR [n=500] [seed=0] [size=128] [texture_noise=0.0] [zoom=1.0] "
          "[workers=N]")


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; prints the dataset path. Exit code 2 for bad arguments or an existing ``out``."""
    args = sys.argv[1:] if argv is None else argv
    kwargs: dict[str, object] = {"n": 500}
    for arg in args:
        if arg in ("-h", "--help"):
            print(_USAGE)
            raise SystemExit(0)
        key, sep, value = arg.partition("=")
        if not sep or key not in _CLI_TYPES:
            print(
                f"synth: bad argument {arg!r}; expected key=value with key in {', '.join(_CLI_TYPES)}", file=sys.stderr
            )
            raise SystemExit(2)
        try:
            kwargs[key] = _CLI_TYPES[key](value)
        except ValueError:
            print(f"synth: bad value for {key}: {value!r}", file=sys.stderr)
            raise SystemExit(2) from None
    if "out" not in kwargs:
        print(f"synth: missing out=DIR; {_USAGE}", file=sys.stderr)
        raise SystemExit(2)
    try:
        path = generate(**kwargs)  # type: ignore[arg-type]
    except (FileExistsError, ValueError) as e:
        print(f"synth: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(path)


if __name__ == "__main__":
    main()
