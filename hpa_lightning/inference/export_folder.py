"""Writing the export folder (format and usage: hpa_lightning/export.py): safetensors weights and card.json, under a
temporary name renamed when complete."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from hpa_lightning.classes import CHANNELS
from hpa_lightning.errors import InferenceError
from hpa_lightning.files import atomic_folder, write_json_atomic
from hpa_lightning.inference.load import (
    CARD_NAME,
    ENSEMBLE_FORMAT,
    EXPORT_FORMAT,
    WEIGHTS_NAME,
    InferenceModel,
    load_model,
    sha256_file,
)
from hpa_lightning.inference.tta import TTA_VIEWS


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "timm", "safetensors", "lightning", "hpa_lightning"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _json_ready(value: object) -> object:
    """Tuples (timm's sizes and windows) as lists, so the card is plain JSON."""
    if isinstance(value, (tuple, list)):
        return [_json_ready(v) for v in value]
    return value


def timm_arguments(model: InferenceModel) -> dict | None:
    """The arguments that rebuild the network with timm alone (`timm.create_model(architecture, **timm_args)`:
    channels, classes, pooling, and a fixed-size architecture's size with what depends on it, such as Swin's
    windows); None for a network of the user's own factory."""
    if model.factory is not None:
        return None
    from timm.models import get_model_args

    return {key: _json_ready(value) for key, value in get_model_args(model.net).items()}


def build_card(model: InferenceModel, weights_sha256: str) -> dict:
    mean = model.standardize.mean.flatten().tolist()
    std = model.standardize.std.flatten().tolist()
    return {
        "format": EXPORT_FORMAT,
        "architecture": model.architecture,
        "factory": model.factory,  # the user's own network factory (its model node); null: timm's `architecture`
        "global_pool": model.global_pool,  # timm.create_model's global_pool; null: the architecture's default
        # the size a fixed-size architecture (ViT, Swin, ...) was built for, null for CNNs; dynamic: any input size
        "img_size": model.img_size,
        "dynamic_img_size": bool(model.dynamic_img_size),
        "timm_args": timm_arguments(model),  # timm.create_model(architecture, **timm_args) rebuilds it
        "crop": model.crop,  # trained on random crop.size windows: evaluated on the full image or its centre window
        "library": "timm",
        "in_chans": len(CHANNELS),
        "num_classes": model.num_classes,
        "class_names": list(model.class_names),
        "channels": list(CHANNELS),
        "image_size": int(model.image_size),
        "input": "uint8 (4, S, S) R,G,B,Y, each channel resized to S x S (PIL bilinear, reducing_gap=3); "
                 "x / 255, then (x - mean) / std per channel; sigmoid of the logits gives probabilities",
        "mean": mean,
        "std": std,
        "sixteen_bit": str(model.extra.get("sixteen_bit", "divide")),  # how 16-bit channel files become 8-bit
        "thresholds": {name: float(t) for name, t in zip(model.class_names, model.thresholds, strict=True)},
        "threshold_default": float(model.extra.get("threshold_default", 0.5)),
        "ensure_one": bool(model.ensure_one),
        "thresholds_source": model.thresholds_source,
        "tta_views": [name for name, _ in TTA_VIEWS],
        "source_checkpoint": str(Path(model.source).resolve()),
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": weights_sha256,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }


def _write_weights_and_card(model: InferenceModel, folder: Path) -> None:
    # Plain contiguous copies: safetensors refuses shared or strided storage.
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "architecture": model.architecture})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder / WEIGHTS_NAME, 0o666 & ~umask)  # safetensors creates it owner-only
    write_json_atomic(folder / CARD_NAME, build_card(model, sha256_file(folder / WEIGHTS_NAME)))


def _publish(out: Path, write) -> Path:
    """`write(tmp)` into a temporary sibling of `out`, renamed to `out` when complete."""
    with atomic_folder(out) as tmp:
        write(tmp)
    return out


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InferenceError(f"{out}: already exists; export never overwrites, remove it or pick another out=")


def _exportable(model: InferenceModel, source: object) -> None:
    if model.extra.get("card") is not None:
        raise InferenceError(f"{source}: already an exported model folder")
    if not model.image_size:
        raise InferenceError(f"{model.source}: training image size unknown (no results.json or config.yaml in its "
                             f"run folder)")


def export_model(source: str | Path, out: str | Path) -> Path:
    """Write the export folder `out` from a run folder or checkpoint; returns `out`."""
    out = Path(out)
    _check_out(out)
    model = load_model(source)
    _exportable(model, source)
    return _publish(out, lambda tmp: _write_weights_and_card(model, tmp))


def export_ensemble(sources: str, out: str | Path, weights: str = "") -> Path:
    """Write an ensemble (several runs, comma-separated, or a folder of runs such as a fold sweep) as one folder:
    `member<i>/` each a single-model export, and a card.json with the members' weights and the ensemble's
    thresholds (chosen on the members' validation predictions, out of fold for folds; see runs/ensemble.py)."""
    from hpa_lightning.inference.predictor import load_members

    out = Path(out)
    _check_out(out)
    members, decider = load_members(sources, weights)
    for model, _ in members:
        _exportable(model, model.source)

    def write(tmp: Path) -> None:
        entries = []
        for i, (model, weight) in enumerate(members):
            (tmp / f"member{i}").mkdir()
            _write_weights_and_card(model, tmp / f"member{i}")
            entries.append({"folder": f"member{i}", "weight": float(weight), "source": str(model.source)})
        write_json_atomic(tmp / CARD_NAME, {
            "format": ENSEMBLE_FORMAT, "members": entries, "class_names": list(decider.class_names),
            "image_size": int(decider.image_size),
            "thresholds": {n: float(t) for n, t in zip(decider.class_names, decider.thresholds, strict=True)},
            "ensure_one": bool(decider.ensure_one), "thresholds_source": decider.thresholds_source,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": _versions()})

    return _publish(out, write)
