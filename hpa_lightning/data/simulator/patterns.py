"""The green (protein) channel: one painter per class, each drawing its pattern relative to the landmark channels."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from hpa_lightning.classes import NUM_CLASSES
from hpa_lightning.data.simulator.landmarks import bump, random_walks, segment_points
from hpa_lightning.data.simulator.scene import LINE_STEP, Canvas, Cell, Scene, blur, cell_window

_Pattern = Callable[[Scene, Canvas, np.ndarray], None]


def _each_cell(sc: Scene, kinds: tuple[str, ...] = ("interphase", "daughter", "mitotic")) -> list[tuple[int, Cell]]:
    return [(i, c) for i, c in enumerate(sc.cells) if c.kind in kinds]


def _count(sc: Scene, c: Cell, lo: int, hi: int) -> int:
    """Object counts scale with cell area relative to a typical interphase cell (radius 27 px at 128)."""
    area = c.a * c.b / (27.0 * sc.unit) ** 2
    return max(1, int(round(sc.rng.integers(lo, hi + 1) * area)))


def _g_nucleoplasm(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    cv.field += sc.gain_map(g) * sc.nuc_soft * (1.0 - sc.nucleoli) * (0.85 + 0.1 * sc.noise(0.8))


def _g_nuclear_membrane(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    ring = bump(sc.nrho - 1.0, 0.1) * ~sc.mitotic_px
    cv.field += sc.gain_map(g) * ring * sc.cell_soft


def _g_nucleoli(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    cv.field += sc.gain_map(g) * sc.nucleoli


def _g_fibrillar_center(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    for i, c in _each_cell(sc):
        for ny, nx, r in c.nucleoli:
            k = int(rng.integers(2, 6))
            rr, ph = np.sqrt(rng.random(k)) * 0.6 * r, rng.random(k) * 2.0 * math.pi
            cv.dots(ny + rr * np.sin(ph), nx + rr * np.cos(ph), g[i] * rng.uniform(0.7, 1.0, k), 0.55 * u)
    cv.field += 0.12 * sc.gain_map(g) * sc.nucleoli


def _g_speckles(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    for i, c in _each_cell(sc):
        ys, xs = sc.sample_points(i, _count(sc, c, 14, 26), regions=(2,))
        cv.dots(ys, xs, g[i] * sc.rng.uniform(0.5, 1.0, ys.size), 0.9 * sc.unit)
    cv.field += 0.15 * sc.gain_map(g) * sc.nuc_soft * (1.0 - sc.nucleoli)


def _g_nuclear_bodies(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    for i, _c in _each_cell(sc):
        ys, xs = sc.sample_points(i, int(sc.rng.integers(1, 4)), regions=(2,))
        cv.dots(ys, xs, g[i], 1.3 * sc.unit)


def _g_er(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    cv.field += sc.gain_map(g) * sc.er / (sc.er.max() + 1e-6)


def _g_golgi(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    blobs = sc.noise(1.2)
    for i, c in _each_cell(sc, ("interphase", "daughter")):
        wy, wx = cell_window(c, sc.size)
        dy, dx = sc.Y[wy, wx] - c.ny, sc.X[wy, wx] - c.nx
        my, mx = c.mtoc[0] - c.ny, c.mtoc[1] - c.nx
        cos_ang = (dy * my + dx * mx) / (np.sqrt(dy * dy + dx * dx) * math.hypot(my, mx) + 1e-6)
        nr = sc.nrho[wy, wx]
        crescent = np.exp(-(((nr - 1.3) / np.float32(0.22)) ** 2)) * np.clip((cos_ang - 0.3) / 0.4, 0.0, 1.0)
        texture = np.clip(0.55 + 0.45 * blobs[wy, wx], 0.1, 1.0)
        cv.field[wy, wx] += g[i] * crescent * texture * (sc.owner[wy, wx] == i) * (sc.region[wy, wx] == 1)


def _dots_in_cytoplasm(lo: int, hi: int, sigma: float, peri: float | None, wmin: float = 0.7) -> _Pattern:
    def pattern(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
        for i, c in _each_cell(sc):
            ys, xs = sc.sample_points(i, _count(sc, c, lo, hi), peri=peri)
            cv.dots(ys, xs, g[i] * sc.rng.uniform(wmin, 1.0, ys.size), sigma * sc.unit)

    return pattern


def _g_intermediate_filaments(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    step = LINE_STEP * u
    for i, c in _each_cell(sc, ("interphase", "daughter")):
        k = _count(sc, c, 8, 13)
        ys0, xs0 = sc.sample_points(i, k, peri=0.4)
        k = ys0.size
        radial = np.arctan2(ys0 - c.ny, xs0 - c.nx)
        theta = radial + np.where(rng.random(k) < 0.5, 1.0, -1.0) * (math.pi / 2) + rng.normal(0.0, 0.4, k)
        steps = int(rng.uniform(1.0, 1.6) * max(c.a, c.b) / step)
        ys, xs = random_walks(ys0, xs0, theta, steps, step, rng.normal(0.0, 0.03 / u, k), 0.0, rng)
        # waviness: a sinusoidal sideways displacement on top of the smooth path
        t = np.arange(steps) * step
        wave = 0.9 * u * np.sin(t[None, :] / (2.2 * u) + rng.uniform(0, 2 * math.pi, (k, 1)))
        ys, xs = ys + wave * np.cos(theta)[:, None], xs - wave * np.sin(theta)[:, None]
        keep = np.cumprod(sc.lookup(sc.owner, ys, xs, -1) == i, axis=1).astype(bool)
        w = np.where(sc.lookup(sc.region, ys, xs, 0) >= 2, 0.45, 1.0) * g[i]
        cv.path(ys[keep], xs[keep], w[keep], 0.65 * u, step)


def _g_actin(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    step = LINE_STEP * u
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


def _g_focal_adhesions(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    step = LINE_STEP * u
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


def _g_microtubules(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    cv.field += sc.gain_map(g) * sc.mt


def _g_microtubule_ends(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    if sc.mt_tips.size:
        ys, xs = sc.mt_tips[..., 0], sc.mt_tips[..., 1]
        owner = np.maximum(sc.lookup(sc.owner, ys[:, 0], xs[:, 0], 0), 0)
        fade = np.linspace(1.0, 0.3, ys.shape[1])[None, :]  # comet: bright at the tip, fading backwards
        cv.path(ys, xs, g[owner][:, None] * fade, 0.8 * sc.unit, LINE_STEP * sc.unit)


def _g_cytokinetic_bridge(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    u = sc.unit
    for i, c in _each_cell(sc, ("daughter",)):
        if c.bridge is None:
            continue
        by, bx, phi = c.bridge
        h = 0.35 * c.a
        ys, xs = segment_points(
            (by - h * math.sin(phi), bx - h * math.cos(phi)),
            (by + h * math.sin(phi), bx + h * math.cos(phi)),
            LINE_STEP * u,
        )
        cv.path(ys, xs, g[i] * 0.8, 0.9 * u, LINE_STEP * u)
        cv.dots(np.array([by]), np.array([bx]), g[i], 1.4 * u)


def _g_mitotic_spindle(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    mitotic = _each_cell(sc, ("mitotic",))
    for (i, c), (ys, xs) in zip(mitotic, sc.spindles, strict=True):
        cv.path(ys, xs, g[i] * 0.6, 0.8 * sc.unit, LINE_STEP * sc.unit)
        cv.dots(np.array([p[0] for p in c.poles]), np.array([p[1] for p in c.poles]), g[i], 1.1 * sc.unit)


def _centrosomes(c: Cell) -> list[tuple[float, float]]:
    return list(c.poles) if c.kind == "mitotic" else [c.mtoc]


def _g_mtoc(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    for i, c in _each_cell(sc):
        pts = np.array(_centrosomes(c))
        cv.dots(pts[:, 0], pts[:, 1], g[i], 1.2 * sc.unit)


def _g_centrosome(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    u = sc.unit
    for i, c in _each_cell(sc):
        for y, x in _centrosomes(c):
            phi = sc.rng.uniform(0.0, 2.0 * math.pi)
            off = np.array([-1.0, 1.0]) * 1.6 * u
            cv.dots(y + off * math.sin(phi), x + off * math.cos(phi), g[i], 0.7 * u)


def _g_lipid_droplets(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
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


def _g_plasma_membrane(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    line = blur(_edges(sc.owner, False).astype(np.float32), 0.6 * sc.unit)
    cv.field += sc.gain_map(g) * line / (line.max() + 1e-6) + 0.08 * sc.gain_map(g) * sc.cyto_soft


def _g_cell_junctions(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    line = blur(_edges(sc.owner, True).astype(np.float32), 1.0 * sc.unit)
    cv.field += sc.gain_map(g) * line / (line.max() + 1e-6)


def _g_mitochondria(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    step = LINE_STEP * u
    for i, c in _each_cell(sc):
        ys0, xs0 = sc.sample_points(i, _count(sc, c, 30, 50), peri=1.0)
        k = ys0.size
        ys, xs = random_walks(
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


def _g_aggresome(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    cells = _each_cell(sc, ("interphase", "daughter"))
    chosen = [cc for cc in cells if rng.random() < 0.7] or cells[:1]
    for i, c in chosen:
        dy, dx = c.mtoc[0] - c.ny, c.mtoc[1] - c.nx
        norm = math.hypot(dy, dx) + 1e-6
        y, x = c.mtoc[0] + 1.5 * u * dy / norm, c.mtoc[1] + 1.5 * u * dx / norm
        cv.dots(y + rng.normal(0.0, 1.2 * u, 3), x + rng.normal(0.0, 1.2 * u, 3), g[i] * 0.7, 2.3 * u)


def _g_cytosol(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    cv.field += sc.gain_map(g) * sc.cyto_soft * (0.85 + 0.1 * sc.noise(1.5))


def _g_cytoplasmic_bodies(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    u = sc.unit
    for i, _c in _each_cell(sc):
        ys, xs = sc.sample_points(i, int(sc.rng.integers(1, 4)))
        for y, x, r in zip(ys, xs, sc.rng.uniform(2.0, 2.8, ys.size) * u, strict=True):
            y0, y1 = max(0, int(y - r - 2)), min(sc.size, int(y + r + 3))
            x0, x1 = max(0, int(x - r - 2)), min(sc.size, int(x + r + 3))
            d = np.sqrt((sc.Y[y0:y1, x0:x1] - y) ** 2 + (sc.X[y0:y1, x0:x1] - x) ** 2)
            cv.field[y0:y1, x0:x1] += g[i] * np.clip(r + 0.5 - d, 0.0, 1.0)


def _g_rods_rings(sc: Scene, cv: Canvas, g: np.ndarray) -> None:
    rng, u = sc.rng, sc.unit
    step = LINE_STEP * u
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
                ry, rx = segment_points(
                    (y - h * math.sin(phi), x - h * math.cos(phi)), (y + h * math.sin(phi), x + h * math.cos(phi)), step
                )
                cv.path(ry, rx, g[i], 0.6 * u, step)


GREEN_PAINTERS: dict[int, _Pattern] = {
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


assert sorted(GREEN_PAINTERS) == list(range(NUM_CLASSES)), "every class needs a green pattern"
