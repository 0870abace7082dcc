"""Prediction over an image folder (usage: hpa_lightning/predict.py): which Ids, their files, decoding in DataLoader
workers at the training resolution, TTA probabilities on the device, and the submission files written atomically."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hpa_lightning import metrics
from hpa_lightning.classes import CHANNELS, class_set
from hpa_lightning.data.image_folder import SAMPLE_SUBMISSION, PredictInput, resolve_input  # noqa: F401
from hpa_lightning.data.sources import (
    DEFAULT_MAX_IMAGE_PIXELS,
    SIXTEEN_BIT_RULES,
    check_max_pixels,
    load_sample,
)
from hpa_lightning.errors import DataError, InferenceError
from hpa_lightning.files import atomic_path
from hpa_lightning.inference.load import CARD_NAME, ENSEMBLE_FORMAT, InferenceModel, load_model
from hpa_lightning.inference.tta import TTA_REDUCTIONS, crop_windows, tta_probabilities, tta_views
from hpa_lightning.machine import available_cpus
from hpa_lightning.models.augment import center_crop
from hpa_lightning.models.meta import cannot_take
from hpa_lightning.runs import layout
from hpa_lightning.runs.ensemble import ensemble_evaluation, member_runs, member_weights
from hpa_lightning.targets import trust_in_this_process


class ImageFolderDataset(Dataset):
    """Decodes one sample per item at the training resolution; a decode error travels as a message, not a raise,
    so the main process can report it as one line (DataLoader re-raises worker exceptions with their traceback).
    Decoded as the packer decodes (JPGs at a reduced DCT scale where `size` allows, files above `max_pixels` pixels
    refused from their header)."""

    def __init__(self, image_dir: Path, ids: list[str], size: int, sixteen_bit: str = "divide",
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.image_dir, self.ids, self.size, self.sixteen_bit = image_dir, ids, size, sixteen_bit
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, object]:
        try:
            image = torch.from_numpy(load_sample(self.image_dir, self.ids[i], self.size, self.sixteen_bit,
                                                 self.max_pixels))
            error = ""
        except DataError as err:
            image, error = torch.zeros((len(CHANNELS), self.size, self.size), dtype=torch.uint8), str(err)
        return {"image": image, "index": i, "error": error}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceError(f"device={name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InferenceError(f"device={name}: not a torch device (auto, cpu, cuda, cuda:N)") from None


def default_workers() -> int:
    return min(8, available_cpus())


def member_probabilities(model: InferenceModel, uint8: Tensor, tta: int, channels_last: bool, tta_crops: int,
                         tta_reduce: str, image_size: int) -> Tensor:
    """(B, C) probabilities of one model for a uint8 batch on its device: its standardisation, its crop rule (the
    full image or centre window as validated, or `tta_crops` fixed windows), the dihedral views reduced."""
    crop_size, crop_eval = (model.crop or {}).get("size"), (model.crop or {}).get("eval", "full")
    x = model.standardize(uint8)
    windows = crop_windows(image_size, crop_size, tta_crops) if tta_crops else []
    if crop_size and not windows and crop_eval == "center":
        x = center_crop(x, crop_size)
    return tta_probabilities(model.net, x, tta, channels_last, crops=windows, crop_size=crop_size, reduce=tta_reduce)


def predict_probabilities(members: InferenceModel | Sequence[tuple[InferenceModel, float]], data: PredictInput,
                          image_size: int, tta: int = 1, batch_size: int = 32, workers: int = 0,
                          device: torch.device | str = "cpu", progress: bool = False, channels_last: bool = True,
                          sixteen_bit: str | None = None, tta_crops: int = 0, tta_reduce: str = "mean",
                          max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """(N, C) probabilities in `data.ids` order: of one model, or the weighted mean of ensemble `members` (model,
    weight) over one decoding of each batch. A model trained on crops sees the full image or its centre window as in
    its validation, or with `tta_crops=K` K fixed random windows of its crop size (each with the dihedral views);
    the views are reduced by `tta_reduce` (mean or max)."""
    from tqdm import tqdm

    members = [(members, 1.0)] if isinstance(members, InferenceModel) else list(members)
    tta_views(tta)  # validate before any work
    device = torch.device(device)
    for model, _ in members:
        if tta_crops and not (model.crop or {}).get("size"):
            raise InferenceError(f"tta_crops={tta_crops}: {model.source} was trained without crops (crop.size null)")
        model.to(device)
        if channels_last:  # 2-3x faster convolutions on CPU (oneDNN) and on GPU tensor cores
            model.net.to(memory_format=torch.channels_last)
    first = members[0][0]
    rule = sixteen_bit or first.extra.get("sixteen_bit", "divide")  # as the training store was packed
    dataset = ImageFolderDataset(data.image_dir, data.ids, image_size, rule, max_pixels)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    probs = np.zeros((len(data.ids), first.num_classes), dtype=np.float32)
    with tqdm(total=len(data.ids), desc=f"predict tta={tta}", unit="img", disable=not progress,
              file=sys.stderr) as bar:
        for batch in loader:
            errors = [e for e in batch["error"] if e]
            if errors:
                bar.leave = False  # clear the bar: the error stays the last, single line
                bar.close()
                raise DataError(errors[0])
            uint8 = batch["image"].to(device, non_blocking=True)
            mean = sum(weight * member_probabilities(model, uint8, tta, channels_last, tta_crops, tta_reduce,
                                                     image_size) for model, weight in members)
            probs[batch["index"].numpy()] = mean.cpu().numpy()
            bar.update(len(batch["index"]))
    return probs


def probabilities_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_probabilities.csv")


def incomplete_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_incomplete.csv")


def write_outputs(out: str | Path, ids: list[str], probs: np.ndarray, model: InferenceModel) -> tuple[Path, Path]:
    """The submission and the probabilities CSV, each written under a temporary name and renamed when complete."""
    out = Path(out)
    prob_path = probabilities_path(out)
    decisions = metrics.decide(probs, model.thresholds, ensure_one=model.ensure_one)
    submission = pd.DataFrame({"Id": ids, "Predicted": [" ".join(map(str, np.flatnonzero(row)))
                                                        for row in decisions]})
    table = pd.concat([pd.DataFrame({"Id": ids}), pd.DataFrame(probs, columns=model.class_names)], axis=1)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # both written before either is renamed: a failure leaves neither
        with atomic_path(prob_path) as prob_tmp, atomic_path(out) as out_tmp:
            table.to_csv(prob_tmp, index=False, float_format="%.6f")
            submission.to_csv(out_tmp, index=False)
    except OSError as err:
        raise InferenceError(f"out={out}: cannot write ({err.strerror or type(err).__name__})") from None
    return out, prob_path


def load_members(ckpt: str, weights: str = "") -> tuple[list[tuple[InferenceModel, float]], InferenceModel]:
    """The model or ensemble `ckpt` names, with each member's weight, and the model whose class names and thresholds
    decide. One run folder, checkpoint or export folder is one model; several (comma-separated) or a folder of runs
    (a sweep: every finished run in it, e.g. the folds of `+sweep=folds`) are an ensemble, averaged with `weights`
    (equal by default). An ensemble's thresholds are chosen on its members' validation predictions, out of fold for
    folds (runs/ensemble.py); members without them (exports) use the weighted mean of their own thresholds."""
    sources = [Path(s) for s in str(ckpt).split(",") if s]
    if len(sources) == 1 and (sources[0] / CARD_NAME).is_file():
        card = json.loads((sources[0] / CARD_NAME).read_text())
        if card.get("format") == ENSEMBLE_FORMAT:
            return _exported_ensemble(sources[0], card, weights)
    runs_folder = [s.is_dir() and not (s / layout.RESULTS).is_file() and not (s / CARD_NAME).is_file()
                   for s in sources]
    if len(sources) == 1 and not runs_folder[0]:
        model = load_model(sources[0])
        if weights:
            raise InferenceError(f"weights={weights}: only an ensemble (several ckpt= or a folder of runs) has weights")
        return [(model, 1.0)], model
    paths = [path for s, many in zip(sources, runs_folder, strict=True) for path in (member_runs([s]) if many else [s])]
    try:
        given = [float(w) for w in str(weights).split(",") if w] if weights else None
    except ValueError:
        raise InferenceError(f"weights={weights}: expected comma-separated numbers") from None
    w = member_weights(given, len(paths))
    models = [load_model(path) for path in paths]
    first = models[0]
    for model in models[1:]:
        if model.class_names != first.class_names or model.image_size != first.image_size:
            raise InferenceError(f"{model.source}: other classes or image size than {first.source}; cannot ensemble")
    run_dirs = [Path(m.extra["run_dir"]) if m.extra.get("run_dir") else None for m in models]
    if all(d is not None and (d / layout.VAL_PREDICTIONS).is_file() for d in run_dirs):
        evaluation = ensemble_evaluation(run_dirs, w)
        thresholds, ensure_one = np.asarray(evaluation["thresholds"]), bool(evaluation["ensure_one"])
        origin = f"{evaluation['validation'].replace('_', ' ')} validation predictions of the {len(models)} members"
    else:
        thresholds = np.sum([wi * m.thresholds for wi, m in zip(w, models, strict=True)], axis=0)
        ensure_one, origin = first.ensure_one, f"the weighted mean of the {len(models)} members' thresholds"
    decider = replace(first, thresholds=thresholds, ensure_one=ensure_one, thresholds_source=origin,
                      source=f"an ensemble of {len(models)} ({', '.join(str(m.source) for m in models)})")
    return list(zip(models, w.tolist(), strict=True)), decider


def _exported_ensemble(folder: Path, card: dict, weights: str) -> tuple[list[tuple[InferenceModel, float]],
                                                                          InferenceModel]:
    """An ensemble written by `export`: its members, weights and thresholds as the card says."""
    if weights:
        raise InferenceError(f"weights={weights}: {folder} is an exported ensemble; its weights are in its card")
    try:
        members = [(load_model(folder / entry["folder"]), float(entry["weight"])) for entry in card["members"]]
        thresholds = np.array([float(card["thresholds"][name]) for name in card["class_names"]])
        ensure_one = bool(card["ensure_one"])
    except (KeyError, TypeError, ValueError) as err:
        raise InferenceError(f"{folder / CARD_NAME}: missing or invalid field ({type(err).__name__}: {err})") from None
    first = members[0][0]
    decider = replace(first, thresholds=thresholds, ensure_one=ensure_one,
                      thresholds_source=f"{folder / CARD_NAME} ({card.get('thresholds_source')})",
                      source=f"the exported ensemble {folder} of {len(members)}")
    return members, decider


def check_classes(model: InferenceModel, classes: str) -> None:
    """`classes=` names the class set the caller expects; a model trained on another is one line naming both."""
    if not classes:
        return
    expected = class_set(classes)
    if list(expected.names) != list(model.class_names):
        raise InferenceError(f"classes={classes}: {len(expected)} classes ({expected.names[0]}, ...), but "
                             f"{model.source} was trained on {model.num_classes} ({model.class_names[0]}, ...)")


def check_network_size(model: InferenceModel, image_size: int, tta_crops: int) -> None:
    """The network takes the size it will see (a fixed-size ViT or Swin without dynamic image size takes only the
    size it was built for), or one line says so before any image is read."""
    crop_size, crop_eval = (model.crop or {}).get("size"), (model.crop or {}).get("eval", "full")
    seen = crop_size if crop_size and (tta_crops or crop_eval == "center") else image_size
    why = cannot_take(model.net, seen)
    validated = crop_size if crop_size and crop_eval == "center" else model.image_size
    # a network the meta device cannot run even at the size it was validated at (one of the user's own) is not judged
    if why and (not validated or cannot_take(model.net, validated) is None):
        raise InferenceError(f"image_size={image_size}: {model.source} ({model.architecture}) cannot take {seen} px "
                             f"inputs ({why}); predict at its training resolution (leave image_size unset)")


def run(args: dict[str, object]) -> dict[str, object]:
    if not args["ckpt"] or not args["input"]:
        raise InferenceError("ckpt=RUN_DIR|CKPT|EXPORT_DIR and input=DIR are required")
    if Path(str(args["out"])).is_dir():
        raise InferenceError(f"out={args['out']}: is a folder; give the submission file name (e.g. submission.csv)")
    tta, batch_size, tta_crops = int(args["tta"]), int(args["batch_size"]), int(args["tta_crops"])
    tta_views(tta)
    if tta_crops < 0:
        raise InferenceError(f"tta_crops={tta_crops}: must be >= 0")
    if args["tta_reduce"] not in TTA_REDUCTIONS:
        raise InferenceError(f"tta_reduce={args['tta_reduce']}: must be one of {', '.join(TTA_REDUCTIONS)}")
    if args["sixteen_bit"] and args["sixteen_bit"] not in SIXTEEN_BIT_RULES:
        raise InferenceError(f"sixteen_bit={args['sixteen_bit']}: expected one of {', '.join(SIXTEEN_BIT_RULES)}")
    if batch_size < 1:
        raise InferenceError(f"batch_size={batch_size}: must be >= 1")
    max_pixels = check_max_pixels(args["max_image_pixels"], "max_image_pixels")
    device = resolve_device(str(args["device"]))
    workers = int(args["workers"]) if int(args["workers"]) >= 0 else default_workers()
    data = resolve_input(str(args["input"]), str(args["image_dir"]))  # cheap checks before loading the model
    trust_in_this_process(str(args.get("trust", "")))
    members, model = load_members(str(args["ckpt"]), str(args["weights"]))
    check_classes(model, str(args.get("classes", "")))
    image_size = int(args["image_size"]) or model.image_size
    if not image_size:
        raise InferenceError(f"{model.source}: training image size unknown (no results.json or config.yaml in its "
                             f"run folder); pass image_size=N")
    if image_size < 8:
        raise InferenceError(f"image_size={image_size}: must be at least 8")
    if model.image_size and image_size != model.image_size:
        print(f"note: image_size={image_size} overrides the training resolution {model.image_size}", file=sys.stderr)
    for member, _ in members:
        check_network_size(member, image_size, tta_crops)
    started = time.perf_counter()
    probs = predict_probabilities(members, data, image_size, tta=tta, batch_size=batch_size, workers=workers,
                                  device=device, progress=bool(args["progress"]),
                                  channels_last=bool(args["channels_last"]), sixteen_bit=str(args["sixteen_bit"]),
                                  tta_crops=tta_crops, tta_reduce=str(args["tta_reduce"]), max_pixels=max_pixels)
    elapsed = time.perf_counter() - started
    out, prob_path = write_outputs(str(args["out"]), data.ids, probs, model)
    skipped = incomplete_path(out)
    skipped.unlink(missing_ok=True)  # never leave an earlier run's list beside this run's outputs
    if data.incomplete:
        pd.DataFrame({"Id": list(data.incomplete), "missing": [" ".join(m) for m in data.incomplete.values()]}
                     ).to_csv(skipped, index=False)
    return {"out": out, "probabilities": prob_path, "n": len(data.ids), "seconds": elapsed, "tta": tta,
            "tta_crops": tta_crops, "tta_reduce": args["tta_reduce"],
            "device": device, "image_size": image_size, "model": model, "ids_from": data.source,
            "incomplete": skipped if data.incomplete else None, "n_incomplete": len(data.incomplete)}
