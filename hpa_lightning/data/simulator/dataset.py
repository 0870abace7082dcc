"""Synthetic Human Protein Atlas 2018 data in the Kaggle layout (``train.csv`` + ``train/{Id}_{channel}.png``).

Labels follow the Kaggle per-class frequencies. Images are a few cells with landmark channels (blue nuclei,
red microtubules, yellow ER) and a green protein channel whose pattern is drawn from the labels *relative to
those landmarks*, so a model has to read green against the other channels.

With ``classes="hpa2021"`` the same cells carry HPA 2021's classes instead, drawn by the 2018 painters in a random
subset of the cells, with cell / nuclei masks and the truth of every cell (``cells=True``; single_cell.py).

Rendering a sample and writing a whole dataset with worker processes (CLI: hpa_lightning/synth.py).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hpa_lightning import SOURCE_ROOT
from hpa_lightning.classes import CHANNELS, NUM_CLASSES
from hpa_lightning.data.simulator import single_cell
from hpa_lightning.data.simulator.labels import (
    ID_STREAM,
    LABEL_STREAM,
    PATTERN_STREAM,
    RENDER_STREAM,
    make_ids,
    sample_labels,
)
from hpa_lightning.data.simulator.landmarks import stain_landmarks
from hpa_lightning.data.simulator.patterns import GREEN_PAINTERS
from hpa_lightning.data.simulator.png import png_gray8
from hpa_lightning.data.simulator.scene import CYTOKINETIC_BRIDGE_CLASS, MITOTIC_SPINDLE_CLASS, Canvas
from hpa_lightning.data.simulator.sensor import expose
from hpa_lightning.files import atomic_folder, remove_stale_temporaries
from hpa_lightning.machine import available_cpus


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
    mitotic = bool(rng.random() < 0.12) or MITOTIC_SPINDLE_CLASS in labels
    dividing = bool(rng.random() < 0.12) or CYTOKINETIC_BRIDGE_CLASS in labels
    sc, (red, blue, yellow), green_rng, out_rng = stain_landmarks(size, rng, mitotic, dividing, zoom)
    cv = Canvas(size)
    for c in labels:
        strength = green_rng.uniform(0.5, 1.0)
        GREEN_PAINTERS[c](sc, cv, (strength * green_rng.uniform(0.6, 1.0, len(sc.cells))).astype(np.float32))
    return expose((red, cv.render(), blue, yellow), out_rng, texture_noise)


def _plan(n: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """Labels and ids of a dataset; cheap, so every worker recomputes them instead of receiving them."""
    labels = sample_labels(n, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(LABEL_STREAM,))))
    ids = make_ids(n, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(ID_STREAM,))))
    return labels, ids


def _render_range(
    train_dir: str, n: int, seed: int, size: int, texture_noise: float, start: int, step: int, parent: int = 0,
    zoom: float = 1.0, classes: str = "hpa2018", cells: bool = False
) -> None:
    """Render samples start, start + step, ...; each from its own (seed, index) stream: any split, same bytes."""
    labels, ids = _plan(n, seed)
    if classes == "hpa2021":
        pattern_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(PATTERN_STREAM,)))
        patterns = [single_cell.hpa2021_patterns(row, pattern_rng) for row in labels]
    for index in range(start, n, step):
        if parent and os.getppid() != parent:
            return  # generate() was killed without cleanup: stop rather than fill an abandoned folder
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(RENDER_STREAM, index)))
        if classes == "hpa2021":
            sample = single_cell.render_cell_sample(sorted(patterns[index]), size, rng, zoom=zoom,
                                                    texture_noise=texture_noise, patterns=patterns[index])
            single_cell.save_cell_sample(Path(train_dir).parent, ids[index], sample, cells)
            img = sample.image
        else:
            img = render_sample(labels[index], size, rng, texture_noise=texture_noise, zoom=zoom)
        for ch, name in enumerate(CHANNELS):
            with open(os.path.join(train_dir, f"{ids[index]}_{name}.png"), "wb") as fh:
                fh.write(png_gray8(img[ch]))


def _worker_main(spec: str) -> None:
    _render_range(**json.loads(spec))


def _run_workers(train_dir: Path, n: int, seed: int, size: int, texture_noise: float, workers: int,
                 zoom: float = 1.0, classes: str = "hpa2018", cells: bool = False) -> None:
    """Render in ``workers`` fresh interpreters.

    Plain subprocesses rather than multiprocessing: fork is unsafe once the caller runs threads (Lightning, torch),
    and spawn re-imports the caller's ``__main__``, which breaks scripts without a ``__name__`` guard.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH")) if p
    )
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"  # one single-threaded process per core
    code = "import sys; from hpa_lightning.data.simulator.dataset import _worker_main; _worker_main(sys.argv[1])"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for w in range(workers):
            spec = dict(train_dir=str(train_dir), n=n, seed=seed, size=size, texture_noise=texture_noise, start=w,
                        zoom=zoom, classes=classes, cells=cells)
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
    classes: str = "hpa2018",
    cells: bool = False,
) -> Path:
    """Write ``n`` samples in the Kaggle HPA 2018 layout to ``out`` and return it.

    ``classes="hpa2021"`` writes the HPA 2021 layout instead: ``train.csv`` as ``ID,Label`` ('|'-separated hpa2021
    ids) and the channel PNGs, the 2021 classes drawn by the 2018 patterns with heterogeneous cells
    (single_cell.py); ``cells=True`` (hpa2021 only) adds ``masks/{ID}_cell_mask.png`` and
    ``masks/{ID}_nuclei_mask.png`` (16-bit label PNGs) and ``cell_truth.csv`` (the submission format, confidence 1).

    Output is byte-identical for a given (n, seed, size, texture_noise, zoom, classes, cells) whatever ``workers``
    is (default: the CPUs available; each worker is a fresh interpreter). The data are written to a sibling
    ``<out>.tmp-<host>-<pid>`` folder that is renamed to ``out`` only once complete; ``out`` must not exist
    (FileExistsError).
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
    if classes not in ("hpa2018", "hpa2021"):
        raise ValueError(f"classes must be hpa2018 or hpa2021, got {classes!r}")
    if cells and classes != "hpa2021":
        raise ValueError("cells=true (cell masks and truth) needs classes=hpa2021")
    workers = available_cpus() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if root.exists():
        raise FileExistsError(f"{root} already exists; synth never overwrites, remove it or pick another out=")
    root.parent.mkdir(parents=True, exist_ok=True)
    absolute = Path(os.path.abspath(root))  # normalises "." and trailing slashes before taking the name
    remove_stale_temporaries(absolute)
    # an existing `root` is refused above; one that another generator publishes meanwhile is a FileExistsError
    with atomic_folder(absolute, unique=False) as tmp:
        train_dir = tmp / "train"
        train_dir.mkdir()
        labels, ids = _plan(n, seed)
        if classes == "hpa2021":
            single_cell.prepare_folders(tmp, cells)
        workers = min(workers, n)
        if workers == 1:
            _render_range(str(train_dir), n, seed, size, texture_noise, start=0, step=1, zoom=zoom, classes=classes,
                          cells=cells)
        else:
            _run_workers(train_dir, n, seed, size, texture_noise, workers, zoom, classes, cells)
        if classes == "hpa2021":  # the labels drawn may differ from the plan's: the workers' records say
            single_cell.write_cell_tables(tmp, ids, cells)
        else:
            with open(tmp / "train.csv", "w", newline="") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(["Id", "Target"])
                for sample_id, lab in sorted(zip(ids, labels, strict=True)):  # Kaggle's train.csv is sorted by Id
                    writer.writerow([sample_id, " ".join(map(str, lab))])
    return root
