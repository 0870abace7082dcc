from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpa_lightning.classes import CHANNELS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def kaggle_folder(tmp_path: Path) -> Path:
    targets = {f"id{i:03d}": " ".join(str(c) for c in {i % 28, (i * 7) % 28}) for i in range(40)}
    return write_kaggle_folder(tmp_path / "kaggle", targets)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache (synthetic data + packed stores) shared by the end-to-end tests of a session."""
    return tmp_path_factory.mktemp("hpa_cache")
