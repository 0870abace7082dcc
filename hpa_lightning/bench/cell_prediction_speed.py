"""Section 9: per-cell prediction (`predict cells=MASKS`, inference/cell_scoring.py), cells scored per second by each
`cell_score`, side by side over the same synthetic HPA 2021 images and masks: `image` (one image pass, its
probabilities copied to every cell) against `cam` (the same pass plus the class maps measured in every cell), `crop`
(every cell's crop through a cell model) and `blend` (both). Untrained resnet18s of the hpa2021 classes at the
profile's sides: speed does not depend on the weights. Decoding, masks and crops included (one process, no workers,
alternating rounds, the median)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from hpa_lightning.bench.common import Profile, median, note
from hpa_lightning.classes import class_set
from hpa_lightning.data.simulator.dataset import generate
from hpa_lightning.inference.cell_scoring import CELL_SCORES, CellImageDataset, score_cells
from hpa_lightning.inference.load import InferenceModel, load_model
from hpa_lightning.models.module import HPAModule

CELLS_ZOOM_AT_2048 = 0.35  # the simulator's HPA 2021 cells at 2048 px are 200-400 px across at this zoom


def _model(folder: Path, image_size: int, seed: int) -> InferenceModel:
    """A run folder holding an untrained resnet18 of the hpa2021 classes, loaded as predict loads it."""
    (folder / "checkpoints").mkdir(parents=True)
    torch.manual_seed(seed)
    module = HPAModule(model={"name": "resnet18", "pretrained": False, "drop_rate": 0.0, "channels_last": False},
                       loss={"_target_": "hpa_lightning.models.losses.FocalLoss", "name": "focal", "gamma": 0.2},
                       optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.02},
                       mean=[0.1] * 4, std=[0.2] * 4, class_names=list(class_set("hpa2021").names))
    ckpt = folder / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, ckpt)
    (folder / "results.json").write_text(json.dumps({"status": "completed", "image_size": image_size,
                                                     "best_checkpoint": str(ckpt)}))
    return load_model(folder)


def bench_cell_prediction(prof: Profile, seed: int, cache: Path) -> dict:
    """Cells per second of each cell_score over `prof.cells_images` images of `prof.cells_px` px."""
    size = prof.cells_px
    root = cache / f"cells-n{prof.cells_images}-px{size}-seed{seed}"
    if not (root / "cell_truth.csv").is_file():
        note(f"cells: rendering {prof.cells_images} HPA 2021 images of {size} px with masks")
        generate(root, n=prof.cells_images, seed=seed, size=size, zoom=CELLS_ZOOM_AT_2048 * 2048 / size, workers=1,
                 classes="hpa2021", cells=True)
    ids = sorted(p.name.removesuffix("_cell_mask.png") for p in (root / "masks").glob("*_cell_mask.png"))
    with tempfile.TemporaryDirectory() as tmp:
        image_model = _model(Path(tmp) / "image", prof.cells_image_size, seed)
        cell_model = _model(Path(tmp) / "cell", prof.cells_crop_size, seed + 1)
        seconds: dict[str, list[float]] = {method: [] for method in CELL_SCORES}
        cells = 0
        for _ in range(prof.cells_rounds):
            for method in CELL_SCORES:
                dataset = CellImageDataset(root / "train", ids, root / "masks", None, prof.cells_image_size,
                                           prof.cells_crop_size if method in ("crop", "blend") else None)
                started = time.perf_counter()
                scored, _ = score_cells(dataset, method, image_model if method != "crop" else None,
                                        cell_model if method in ("crop", "blend") else None, channels_last=True)
                seconds[method].append(time.perf_counter() - started)
                cells = sum(len(image.boxes) for image in scored)
    per_s = {method: cells / median(times) for method, times in seconds.items()}
    return {"ratio": per_s["image"] / per_s["blend"], "cells_per_s": per_s, "images": len(ids), "cells": cells,
            "image_px": size, "image_model_px": prof.cells_image_size, "cell_model_px": prof.cells_crop_size,
            "rounds": prof.cells_rounds, "threads": torch.get_num_threads(),
            "mean_cells": cells / max(1, len(ids))}
