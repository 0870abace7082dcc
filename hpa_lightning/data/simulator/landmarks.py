"""The landmark channels of a synthetic image: blue nuclei, red microtubules, yellow endoplasmic reticulum."""

from __future__ import annotations

import math

import numpy as np

from hpa_lightning.data.simulator.scene import LINE_STEP, Canvas, Cell, Scene, blur, build_scene

_TIP_POINTS = 4  # points of a microtubule end drawn as a comet


def segment_points(p: tuple[float, float], q: tuple[float, float], step: float) -> tuple[np.ndarray, np.ndarray]:
    m = max(2, int(math.hypot(q[0] - p[0], q[1] - p[1]) / step) + 1)
    t = np.linspace(0.0, 1.0, m)
    return p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])


def random_walks(
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


def _spindle(c: Cell, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Fibres from both poles to points along the metaphase plate."""
    t = np.linspace(-0.9, 0.9, 9) * c.na
    qy, qx = c.ny + t * math.sin(c.nangle), c.nx + t * math.cos(c.nangle)
    s = np.linspace(0.0, 1.0, max(2, int(0.8 * c.a / step)))[None, :]
    ys_l, xs_l = [], []
    for py, px in c.poles:
        ys_l.append(py + s * (qy[:, None] - py))
        xs_l.append(px + s * (qx[:, None] - px))
    return np.concatenate(ys_l).ravel(), np.concatenate(xs_l).ravel()


def draw_microtubules(sc: Scene) -> np.ndarray:
    """Red: filaments radiating from each MTOC to the membrane; spindles in mitotic cells; bridges in daughters."""
    rng, u = sc.rng, sc.unit
    cv = Canvas(sc.size)
    step = LINE_STEP * u
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
            ys, xs = segment_points(
                (by - h * math.sin(phi), bx - h * math.cos(phi)), (by + h * math.sin(phi), bx + h * math.cos(phi)), step
            )
            cv.path(ys, xs, 1.2, 0.8 * u, step)
    # All filaments of the image in one batch of walks; each is cut where it first leaves its cell.
    ray_cell, ray_len = np.concatenate(cell_of), np.concatenate(lengths)
    k = ray_cell.size
    steps = int(ray_len.max() / step) + 1
    ys, xs = random_walks(
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
    ends = interphase & (n_in < steps) & within[np.arange(k), exit_at] & (n_in > 4 / LINE_STEP)
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


def bump(x: np.ndarray, width: float) -> np.ndarray:
    """1 / (1 + (x / width)^4): a Gaussian-like bump, several times cheaper than exp on full images."""
    q = x * np.float32(1.0 / width)
    q *= q
    return np.float32(1.0) / (np.float32(1.0) + q * q)


def draw_reticulum(sc: Scene) -> np.ndarray:
    """Yellow: a reticular network (zero crossings of band-passed noise), densest around the nucleus."""
    u = sc.unit
    raw = sc.rng.random((sc.size, sc.size), dtype=np.float32)
    band = blur(raw, 1.1 * u) - blur(raw, 2.8 * u)
    band /= band.std() + 1e-6
    net = bump(band, 0.45)
    d = np.maximum(sc.nrho - 1.0, 0.0) * np.float32(1.0 / 0.6)
    peri = np.float32(1.0) / (np.float32(1.0) + d * d)
    peri = np.where(sc.mitotic_px, np.float32(0.6), peri)  # ER disperses in mitosis
    envelope = bump(sc.nrho - 1.0, 0.12) * ~sc.mitotic_px
    er = sc.cyto_soft * (0.25 + 0.75 * peri) * (0.2 + 0.8 * net) + 0.35 * envelope * sc.cell_soft
    sc.er = er.astype(np.float32)
    return sc.er


def draw_nuclei(sc: Scene) -> np.ndarray:
    """Blue: filled nuclei with chromatin texture and darker nucleoli; condensed plates are brighter."""
    chromatin = sc.noise(0.8)
    blue = sc.nuc_soft * (0.72 + 0.12 * chromatin) * (1.0 - 0.55 * sc.nucleoli)
    return np.where(sc.mitotic_px, sc.nuc_soft * 1.25, blue)


def stain_landmarks(
    size: int, rng: np.random.Generator, mitotic: bool, dividing: bool, zoom: float, count: tuple[int, int] = (3, 6)
) -> tuple[Scene, tuple[np.ndarray, np.ndarray, np.ndarray], np.random.Generator, np.random.Generator]:
    """The scene and its landmark channels (red, blue, yellow), then the green and sensor generators split off.

    The scene's own generator becomes the green one (``sc.rng``), as the painters draw from ``sc.rng``.
    """
    sc = build_scene(size, rng, mitotic, dividing, zoom, count)
    red = draw_microtubules(sc)
    yellow = draw_reticulum(sc)
    blue = draw_nuclei(sc)
    # cell-to-cell brightness differences of the stains
    red, blue, yellow = (ch * sc.gain_map(rng.uniform(0.7, 1.0, len(sc.cells))) for ch in (red, blue, yellow))
    # Separate streams for green and for the sensor model, so labels do not shift the landmark channels' noise.
    green_rng, out_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=2).tolist())
    sc.rng = green_rng
    return sc, (red, blue, yellow), green_rng, out_rng
