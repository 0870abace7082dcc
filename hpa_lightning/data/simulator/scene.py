"""The scene of a synthetic image: cells (interphase, mitotic, dividing) on a canvas, and the drawing primitives."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

_BASE = 128.0  # geometry below is specified in pixels of a 128 px image and scaled by size / _BASE


MITOTIC_SPINDLE_CLASS, CYTOKINETIC_BRIDGE_CLASS = 17, 16


LINE_STEP = 1.0  # sampling step of drawn lines (px at 128); dense enough for sigma >= 0.6 px after splatting


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


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
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


class Canvas:
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
            out += blur(_splat(ys, xs, ws, self.size), sigma)
        return out


@dataclass
class Cell:
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
class Scene:
    size: int
    unit: float
    rng: np.random.Generator
    cells: list[Cell]
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
            n = blur(unit_noise(self.rng, (self.size, self.size)), sigma * self.unit)
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


def cell_window(c: Cell, size: int) -> tuple[slice, slice]:
    """Bounding box of a cell; wobble is clipped to |sum| <= 0.28 so the outline stays within 1.3 semi-axes."""
    r = 1.3 * max(c.a, c.b) + 2.0
    return (
        slice(max(0, int(c.cy - r)), min(size, int(c.cy + r) + 2)),
        slice(max(0, int(c.cx - r)), min(size, int(c.cx + r) + 2)),
    )


def unit_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
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


def _new_cell(y: float, x: float, r0: float, kind: str, rng: np.random.Generator, u: float) -> Cell:
    if kind == "interphase":
        aspect = rng.uniform(1.0, 1.6)
        a, b = r0 * math.sqrt(aspect), r0 / math.sqrt(aspect)
        wobble = tuple(np.clip(rng.normal(0.0, 0.05, 4), -0.07, 0.07).tolist())
    else:  # mitotic cells round up; daughters are small and round
        aspect = rng.uniform(1.0, 1.15)
        a, b = r0 * math.sqrt(aspect), r0 / math.sqrt(aspect)
        wobble = tuple(np.clip(rng.normal(0.0, 0.02, 4), -0.05, 0.05).tolist())
    angle = rng.uniform(0.0, math.pi)
    cell = Cell(y, x, a, b, angle, wobble, y, x, 1.0, 1.0, angle, kind)
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


def _layout(size: int, rng: np.random.Generator, mitotic: bool, dividing: bool, zoom: float = 1.0,
            count: tuple[int, int] = (3, 6)) -> list[Cell]:
    """Touching cells, between ``count`` (inclusive) planned: each new cell is placed next to an existing one so that
    cell contacts exist (fewer when no place is found)."""
    u = size * zoom / _BASE
    target = int(rng.integers(count[0], count[1] + 1))
    # The first cell always fits, so every image has an interphase cell for the interphase-only patterns.
    plan = ["interphase"] + (["mitotic"] if mitotic else []) + (["pair"] if dividing else [])
    plan += ["interphase"] * max(0, target - len(plan) - dividing)
    cells: list[Cell] = []
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


def build_scene(size: int, rng: np.random.Generator, mitotic: bool, dividing: bool, zoom: float = 1.0,
                count: tuple[int, int] = (3, 6)) -> Scene:
    u = size * zoom / _BASE
    cells = _layout(size, rng, mitotic, dividing, zoom, count)
    Y, X = _grid(size)
    rho = np.full((size, size), 9.0, dtype=np.float32)
    nrho = np.full((size, size), 9.0, dtype=np.float32)
    owner = np.full((size, size), -1, dtype=np.int16)
    for j, c in enumerate(cells):
        wy, wx = cell_window(c, size)
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
    return Scene(
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
