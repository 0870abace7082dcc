"""Export a trained model as a self-contained folder: `python -m hpa_lightning.export ckpt=RUN_DIR|CKPT out=DIR`.

The folder holds
    model.safetensors  the timm network's weights (4-channel stem and 28-way head included), nothing executable
    card.json          what inference needs: timm architecture name, class names, channel order, training image
                       size, normalisation mean/std, tuned thresholds + ensure_one, source checkpoint, versions
and `python -m hpa_lightning.predict ckpt=DIR ...` runs from it without the training config. To use it elsewhere:

    net = timm.create_model(card["architecture"], pretrained=False, in_chans=4, num_classes=card["num_classes"])
    net.load_state_dict(safetensors.torch.load_file("model.safetensors"))
    x = (uint8_rgby / 255 - mean[:, None, None]) / std[:, None, None]   # (4, S, S), R,G,B,Y, S = card image_size
    probs = sigmoid(net(x[None]))

The folder is written under a temporary name and renamed when complete; an existing non-empty `out` is refused.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from hpa_lightning.classes import CHANNELS
from hpa_lightning.cli import UsageError, fail, parse_key_values
from hpa_lightning.files import temporary_sibling, write_json_atomic
from hpa_lightning.inference import (
    CARD_NAME,
    EXPORT_FORMAT,
    TTA_VIEWS,
    WEIGHTS_NAME,
    InferenceError,
    InferenceModel,
    load_model,
    sha256_file,
)

PROG = "hpa_lightning.export"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "timm", "safetensors", "lightning", "hpa_lightning"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def build_card(model: InferenceModel, weights_sha256: str) -> dict:
    mean = model.standardize.mean.flatten().tolist()
    std = model.standardize.std.flatten().tolist()
    return {
        "format": EXPORT_FORMAT,
        "architecture": model.architecture,
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


def export_model(source: str | Path, out: str | Path) -> Path:
    """Write the export folder `out` from a run folder or checkpoint; returns `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InferenceError(f"{out}: already exists; export never overwrites, remove it or pick another out=")
    model = load_model(source)
    if model.extra.get("card") is not None:
        raise InferenceError(f"{source}: already an exported model folder")
    if not model.image_size:
        raise InferenceError(f"{model.source}: training image size unknown (no results.json or config.yaml in its "
                             f"run folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    tmp.mkdir()
    try:
        # Plain contiguous copies: safetensors refuses shared or strided storage.
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "architecture": model.architecture})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / WEIGHTS_NAME, 0o666 & ~umask)  # safetensors creates it owner-only
        write_json_atomic(tmp / CARD_NAME, build_card(model, sha256_file(tmp / WEIGHTS_NAME)))
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename cannot replace a non-empty folder anyway
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv, {"ckpt": None, "out": None}, PROG)
        if not args["ckpt"] or not args["out"]:
            raise UsageError(f"{PROG}: ckpt=RUN_DIR|CKPT and out=DIR are required")
        out = export_model(str(args["ckpt"]), str(args["out"]))
    except (UsageError, InferenceError) as err:
        fail(err)
    size_mb = (out / WEIGHTS_NAME).stat().st_size / 2**20
    print(f"exported {args['ckpt']} -> {out} ({WEIGHTS_NAME} {size_mb:.1f} MiB, {CARD_NAME})")


if __name__ == "__main__":
    main()
