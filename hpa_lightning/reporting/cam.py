"""Where each label comes from: class activation maps of a trained model (CAM or Grad-CAM, models/class_maps.py)
over the RGB composite of an image, upsampled bilinearly to the image and shown scaled to [0, 1] (their maximum)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from hpa_lightning.models.class_maps import CAM_METHODS, class_maps

if TYPE_CHECKING:
    from hpa_lightning.inference.cell_scoring import CellImageDataset
    from hpa_lightning.inference.load import InferenceModel


def rgb_composite(image: np.ndarray) -> np.ndarray:
    """(4, S, S) uint8 red, green, blue, yellow -> (S, S, 3) uint8: R = red + yellow/2, G = green + yellow/2,
    B = blue (the yellow ER channel shows yellow, the green protein channel keeps its own colour)."""
    red, green, blue, yellow = (image[i].astype(np.uint16) for i in range(4))
    rgb = np.stack([red + yellow // 2, green + yellow // 2, blue], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(S, S, 3) uint8 composite with a (S, S) [0, 1] map blended over it in matplotlib's `jet` colours."""
    from matplotlib import colormaps

    colours = (colormaps["jet"](heat)[..., :3] * 255).astype(np.float32)
    weight = alpha * heat[..., None]  # weak activation leaves the cells visible
    return np.clip(rgb.astype(np.float32) * (1 - weight) + colours * weight, 0, 255).astype(np.uint8)


def chosen_classes(probs: np.ndarray, thresholds: np.ndarray, rule: str, ensure_one: bool) -> list[list[int]]:
    """Per image the classes to explain: `predicted` (at or above their thresholds), `topK` (the K most probable) or
    explicit comma-separated class ids."""
    from hpa_lightning.metrics import decide

    if rule == "predicted":
        return [np.flatnonzero(row).tolist() for row in decide(probs, thresholds, ensure_one=ensure_one)]
    if rule.startswith("top") and rule[3:].isdigit() and int(rule[3:]) > 0:
        return [np.argsort(-row, kind="stable")[: int(rule[3:])].tolist() for row in probs]
    try:
        ids = [int(c) for c in rule.split(",")]
    except ValueError:
        raise ValueError(f"classes={rule}: expected predicted, topK (e.g. top3) or class ids like 0,25") from None
    if not all(0 <= c < probs.shape[1] for c in ids):
        raise ValueError(f"classes={rule}: class ids are 0..{probs.shape[1] - 1}")
    return [ids for _ in probs]


CELL_DRAW_SIDE = 1024  # the longest side of the cell outline picture: 2048 px HPA images halved, small ones as they are


def cell_outlines(full: np.ndarray, labels: np.ndarray, captions: dict[int, str]) -> np.ndarray:
    """(h, w, 3) uint8: the RGB composite of a uint8 (4, H, W) image with every cell's outline in white and its
    caption (its top labels) at its centre, at most CELL_DRAW_SIDE px on the longest side."""
    from PIL import ImageDraw
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    height, width = labels.shape
    scale = min(1.0, CELL_DRAW_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    rgb = np.asarray(Image.fromarray(rgb_composite(full)).resize(size, Image.Resampling.BILINEAR)).copy()
    small = np.asarray(Image.fromarray(labels.astype(np.int32)).resize(size, Image.Resampling.NEAREST))
    rgb[find_boundaries(small, mode="inner")] = 255
    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    ids = sorted(captions)
    for cell_id, (cy, cx) in zip(ids, ndimage.center_of_mass(small > 0, small, ids), strict=True):
        if np.isfinite(cy):
            draw.multiline_text((float(cx), float(cy)), captions[cell_id], fill=(255, 255, 0), anchor="mm",
                                align="center")
    return np.asarray(picture)


def write_index(folder: Path, entries: list[dict], title: str) -> Path:
    """index.html: per image its composite, then each explained class's map with name and probability."""
    rows = []
    for entry in entries:
        cells = [f'<figure><img src="{html.escape(entry["composite"])}" width="256"><figcaption>'
                 f'{html.escape(entry["id"])} (RGB composite)</figcaption></figure>']
        if entry.get("cells"):
            cells.append(f'<figure><img src="{html.escape(entry["cells"])}" width="512"><figcaption>cells and their '
                         f'top labels (cell_score=cam)</figcaption></figure>')
        cells += [f'<figure><img src="{html.escape(m["file"])}" width="256"><figcaption>{m["class_id"]} '
                  f'{html.escape(m["class_name"])}: p={m["probability"]:.3f}</figcaption></figure>'
                  for m in entry["maps"]]
        rows.append(f'<section><h2>{html.escape(entry["id"])}</h2>{"".join(cells)}</section>')
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>"
            "figure{display:inline-block;margin:4px}figcaption{font:12px sans-serif}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{''.join(rows)}</body></html>\n")
    (folder / "index.html").write_text(page)
    return folder / "index.html"


def save_png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path)


def _cells_picture(cell_data: CellImageDataset, index: int, model: InferenceModel, top: int) -> np.ndarray:
    """The outlines of image `index`'s cells, each with its `top` labels by cam score (as `predict cell_score=cam`)."""
    from hpa_lightning.cells.scores import with_negative
    from hpa_lightning.data.sources import load_sample
    from hpa_lightning.errors import InferenceError
    from hpa_lightning.inference.cell_scoring import image_cell_scores

    item = cell_data[index]
    if item.error:
        raise InferenceError(item.error)
    _, cam = image_cell_scores(model, item.image, item.labels, item.boxes)
    scores = with_negative(np.clip(cam, 0.0, 1.0), list(model.class_names))
    captions = {box.cell_id: "\n".join(f"{model.class_names[k]} {scores[j, k]:.2f}"
                                       for k in np.argsort(-scores[j], kind="stable")[:top])
                for j, box in enumerate(item.boxes)}
    full = load_sample(cell_data.image_dir, item.image_id, None, cell_data.sixteen_bit, cell_data.max_pixels)
    return cell_outlines(full, item.labels, captions)


def explain(args: dict[str, object]) -> dict[str, object]:
    """Class maps of the images of `input` (the `ids`, else the first `limit`) for the chosen classes, written to
    the folder `out` (PNG composites, one PNG a map, index.html) under a temporary name renamed when complete."""

    from hpa_lightning.errors import InferenceError
    from hpa_lightning.files import atomic_folder
    from hpa_lightning.inference.load import load_model
    from hpa_lightning.inference.predictor import ImageFolderDataset, resolve_device, resolve_input
    from hpa_lightning.models.augment import center_crop
    from hpa_lightning.targets import trust_in_this_process

    if not args["ckpt"] or not args["input"]:
        raise InferenceError("ckpt=RUN_DIR|CKPT|EXPORT_DIR and input=DIR are required")
    if "," in str(args["ckpt"]):
        raise InferenceError(f"ckpt={args['ckpt']}: explain takes one model, not an ensemble")
    if args["method"] not in CAM_METHODS:
        raise InferenceError(f"method={args['method']}: expected one of {', '.join(CAM_METHODS)}")
    out = Path(str(args["out"]))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InferenceError(f"out={out}: already exists; explain never overwrites, remove it or pick another out=")
    data = resolve_input(str(args["input"]), str(args["image_dir"]))
    wanted = [i for i in str(args["ids"]).split(",") if i]
    unknown = sorted(set(wanted) - set(data.ids))
    if unknown:
        raise InferenceError(f"ids={args['ids']}: {', '.join(unknown[:3])} not found in {data.image_dir}")
    ids = wanted or data.ids[: max(1, int(args["limit"]))]
    trust_in_this_process(str(args.get("trust", "")))
    model = load_model(str(args["ckpt"]))
    device = resolve_device(str(args["device"]))
    model.to(device).net.eval()
    if not model.image_size:
        raise InferenceError(f"{model.source}: training image size unknown (no results.json in its run folder)")
    dataset = ImageFolderDataset(data.image_dir, ids, model.image_size,
                                 str(args["sixteen_bit"]) or model.extra.get("sixteen_bit", "divide"))
    crop = model.crop or {}
    cell_data = None
    if args.get("cells"):
        from hpa_lightning.inference.cell_predictor import mask_source
        from hpa_lightning.inference.cell_scoring import CellImageDataset

        masks, segment = mask_source(str(args["cells"]), float(args["segment_scale"]))
        cell_data = CellImageDataset(data.image_dir, ids, masks, segment, model.image_size, None, dataset.sixteen_bit)
    entries, methods = [], set()
    with atomic_folder(out) as tmp:
        for i, sample_id in enumerate(ids):
            item = dataset[i]
            if item["error"]:
                raise InferenceError(item["error"])
            uint8 = item["image"][None]
            if crop.get("size") and crop.get("eval") == "center":  # as the model was validated
                uint8 = center_crop(uint8, int(crop["size"]))
            x = model.standardize(uint8.to(device))
            with torch.no_grad():
                probs = torch.sigmoid(model.net(x).float()).cpu().numpy()
            try:
                classes = chosen_classes(probs, model.thresholds, str(args["classes"]), model.ensure_one)[0]
            except ValueError as err:
                raise InferenceError(str(err)) from None
            maps, used = class_maps(model.net, x, torch.tensor([classes], device=device), str(args["method"]))
            methods.add(used)
            rgb = rgb_composite(uint8[0].numpy())
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in sample_id)
            save_png(tmp / f"{safe}_rgb.png", rgb)
            entry = {"id": sample_id, "composite": f"{safe}_rgb.png", "maps": []}
            for k, class_id in enumerate(classes):
                name = f"{safe}_class{class_id:02d}.png"
                save_png(tmp / name, overlay(rgb, maps[0, k]))
                entry["maps"].append({"file": name, "class_id": class_id, "class_name": model.class_names[class_id],
                                      "probability": float(probs[0, class_id])})
            if cell_data is not None:
                entry["cells"] = f"{safe}_cells.png"
                save_png(tmp / entry["cells"], _cells_picture(cell_data, i, model, int(args["cell_labels"])))
            entries.append(entry)
        index = write_index(tmp, entries, f"Class maps ({', '.join(sorted(methods))}) of {model.source}")
    return {"out": out, "index": out / index.name, "images": len(entries), "methods": sorted(methods),
            "maps": sum(len(e["maps"]) for e in entries), "model": model}
