from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from hpa_lightning.classes import CHANNELS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`), each worker and the entry points it starts get their share of the cores:
    two trainings at 2 threads each on 2 cores took 3x as long as at 1 thread each (OpenMP threads spin on busy
    cores)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch
        from threadpoolctl import threadpool_limits

        threads = int(os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers))))
        torch.set_num_threads(threads)
        threadpool_limits(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist (`make test`: `--dist loadscope`, a module at a time on one worker) the modules with end-to-end
    tests are handed out first, so that no long one starts last while the other workers wait (plain pytest keeps the
    file order)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if not os.environ.get("HPA_TEST_NETWORK"):  # CI machines may reach no registry; the lent GPU machine never does
        skip = pytest.mark.skip(reason="needs a package registry (PyPI): set HPA_TEST_NETWORK=1")
        for item in items:
            if item.get_closest_marker("network"):
                item.add_marker(skip)


def write_kaggle_folder(root: Path, targets: dict[str, str], size: int = 16, seed: int = 0) -> Path:
    """A minimal Kaggle-layout dataset with random 8-bit grayscale PNGs."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    lines = ["Id,Target"] + [f"{sample_id},{target}" for sample_id, target in targets.items()]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    for sample_id in targets:
        for channel in CHANNELS:
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / "train" / f"{sample_id}_{channel}.png")
    return root


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A 1x1 greyscale PNG whose header says `width` x `height`: what a decompression bomb looks like from its header
    (a real one holds the data too; this one would fail as truncated if it were ever decoded)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the chunk's CRC covers its type and data
    path.write_bytes(bytes(data))
    return path


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train"):
    """The real conf/ composed as the entry point `config_name` composes it (Hydra's node included)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)


@pytest.fixture(scope="session")
def train_config():
    """The training entry point's default configuration, composed once per session (read it, don't change it)."""
    return compose_config()


def run_train(args: list[str], cache: Path, cwd: Path, timeout: int = 600, module: str = "hpa_lightning.train",
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """An entry point (`python -m module args`) in a subprocess, offline, with the session's data cache."""
    env = {**os.environ, "HPA_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def kaggle_folder(tmp_path: Path) -> Path:
    targets = {f"id{i:03d}": " ".join(str(c) for c in {i % 28, (i * 7) % 28}) for i in range(40)}
    return write_kaggle_folder(tmp_path / "kaggle", targets)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache (synthetic data + packed stores) shared by the end-to-end tests of a session, and by all its xdist
    workers: the cache publishes every folder whole by a rename, so workers that build the same store at once both
    end up reading one complete copy (as parallel sweep jobs do)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # <basetemp>/popen-gw<N> -> the session's folder, the same for every worker
    cache = base / "hpa_cache"
    cache.mkdir(exist_ok=True)
    return cache


def built_once(shared_cache: Path, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name` of this test session, made by `build(folder)` once: by whichever xdist worker asks first,
    while the others wait for it (the cache's own lock, hpa_lightning.files.exclusive) and then share it. For what
    the tests of a module dealt one by one to the workers share (`make test-faults`: each cell is a run of its own,
    compared with one reference run)."""
    from hpa_lightning.files import exclusive

    folder = shared_cache.parent / name
    with exclusive(folder):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


def assert_metrics_equal_sklearn(run_dir: Path, results: dict,
                                 predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The run's test macro F1 (at 0.5 and at its saved thresholds) and ROC AUC recomputed by sklearn from
    test_predictions.csv; returns (thresholds, decisions)."""
    probs = predictions[[f"prob_{c}" for c in range(28)]].to_numpy()
    truth = predictions[[f"true_{c}" for c in range(28)]].to_numpy()
    f1 = f1_score(truth, probs >= 0.5, average="macro", zero_division=0)
    assert results["test"]["macro_f1"] == pytest.approx(f1, abs=1e-4)  # CSV keeps 6 decimals
    valid = (truth.sum(0) > 0) & (truth.sum(0) < len(truth))
    auc = roc_auc_score(truth[:, valid], probs[:, valid], average="macro")
    assert results["test"]["roc_auc"] == pytest.approx(auc, abs=1e-4)
    thresholds = np.array(list(json.loads((run_dir / "thresholds.json").read_text())["thresholds"].values()))
    decided = probs >= thresholds
    empty = ~decided.any(axis=1)
    decided[empty, probs[empty].argmax(axis=1)] = True  # thresholds.ensure_one
    tuned = f1_score(truth, decided, average="macro", zero_division=0)
    assert results["test"]["macro_f1_tuned"] == pytest.approx(tuned, abs=1e-3)
    return thresholds, decided


def assert_no_duplicate_steps(run_dir: Path) -> None:
    """After any resume: every training step once in metrics.csv, every validation epoch once, lr_trace.csv
    consecutive."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    steps = metrics.dropna(subset=["train/loss_step"])["step"]
    assert steps.is_unique, steps.tolist()
    assert metrics.dropna(subset=["val/macro_f1"])["epoch"].is_unique
    trace = pd.read_csv(run_dir / "lr_trace.csv")
    assert trace["step"].tolist() == list(range(len(trace)))

