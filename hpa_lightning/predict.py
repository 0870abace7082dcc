"""Predict new images and write a Kaggle submission: `python -m hpa_lightning.predict ckpt=... input=DIR`.

    python -m hpa_lightning.predict ckpt=RUN_DIR|CKPT|EXPORT_DIR input=DIR [out=submission.csv] [tta=1|2|4|8]
        [batch_size=32] [workers=-1] [image_dir=test] [device=auto|cpu|cuda] [image_size=0]
        [channels_last=true] [progress=true] [sixteen_bit=divide|percentile] [tta_crops=0] [tta_reduce=mean|max]
        [trust=mymodels.factory,...] [classes=hpa2018|hpa2021|CSV] [max_image_pixels=268435456]
    python -m hpa_lightning.predict ckpt=IMAGE_MODEL [cell_ckpt=CELL_MODEL] input=DIR cells=MASKS|classical
        [cell_score=cam|crop|blend|image] [cell_weight=0.7] [min_confidence=0.01] [segment_scale=0.25]
        [on_bad_sample=error|skip] [out=submission.csv] [tta=1] ...

Input is the Kaggle layout: `DIR/sample_submission.csv` (Id,Predicted; HPA 2021's has ID) fixes the Ids and their
order, images are `{Id}_{red,green,blue,yellow}.{png,jpg,tif}` in `DIR/test/` (or `DIR/<image_dir>/`), else in DIR
itself. Without sample_submission.csv every Id whose files are found is predicted, in sorted order. The classes are
the model's (its checkpoint or card names them); `classes=` states which set you expect, and a model of another is
refused.

Images are resized to the training resolution exactly as the training store was packed (`image_size` from the run's
results.json or the export card; `image_size=N` overrides), decoded by DataLoader worker processes, standardised
with the training statistics on the device, and averaged over `tta` dihedral views (see `inference/tta.py`); a JPG
at least twice the training resolution is decoded at a reduced DCT scale, as the packer decodes it, and a channel
file whose header declares more than `max_image_pixels` pixels (16384 x 16384) is refused before decoding. A
model trained on crops (`crop.size`) sees what its validation saw (the full image or its centre window), or with
`tta_crops=K` K fixed random windows of its crop size, each with the `tta` views; `tta_reduce=max` takes the
maximum over all views instead of the mean (bestfitting's choice).

Writes `out` (Id,Predicted: space-separated class ids decided with the run's tuned thresholds and ensure_one, or 0.5
without a thresholds.json) and `<out stem>_probabilities.csv` (Id + one column per class name). Both are written to
temporary names and renamed once complete. Bad input is one `error: ...` line on stderr and exit status 2.

Per cell (HPA 2021; docs/cells.md): `cells=MASKS` (a folder of label images, `{ID}_cell_mask.png` or `{ID}.*`, at
each image's size) or `cells=classical` (segmented here, scikit-image at `segment_scale`) gives every image's cells,
and `cell_score` scores them: `cam` (the image model's probability times the cell's share of its class activation),
`crop` (a cell model trained with data=hpa2021_cells, on each cell's crop), `blend` (cell_weight x crop + the rest x
cam) or `image` (every cell gets its image's probabilities: the baseline). Writes `out` in the Kaggle 2021 format
(ID,ImageWidth,ImageHeight,PredictionString: one `label confidence mask` triple per cell and class at or above
`min_confidence`, Negative included, masks at the image's own size) and `<out stem>_cells.csv` (ID, cell id, box,
area, one probability per class); with on_bad_sample=skip, an image without a usable mask is listed in
`<out stem>_skipped.csv` and has no row.

Only the network is rebuilt (the checkpoint's loss, optimizer and augmentation are never built, so a loss of your own
needs nothing); a network of your own factory is rebuilt only with `trust=<its _target_>` (or HPA_TRUST_TARGETS).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.data.sources import DEFAULT_MAX_IMAGE_PIXELS, KAGGLE_IMAGE_DIR
from hpa_lightning.errors import UserError

if TYPE_CHECKING:
    from hpa_lightning.inference.load import InferenceModel

PROG = "hpa_lightning.predict"
DEFAULTS: dict[str, object] = {"ckpt": None, "input": None, "out": "submission.csv", "tta": 1, "batch_size": 32,
                               "workers": -1, "image_dir": KAGGLE_IMAGE_DIR, "device": "auto", "image_size": 0,
                               "channels_last": True, "progress": True, "sixteen_bit": "", "tta_crops": 0,
                               "tta_reduce": "mean", "weights": "", "trust": "",
                               "classes": "", "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
                               "cells": "", "cell_score": "cam", "cell_ckpt": "", "cell_weight": 0.7,
                               "min_confidence": 0.01, "segment_scale": 0.25, "on_bad_sample": "error"}


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv, DEFAULTS, PROG)
        # imported only now (torch, timm: ~4 s on 2 cores), so that --help and a mistyped key answer at once
        if args["cells"]:
            from hpa_lightning.inference.cell_predictor import run as run_cells

            result = run_cells(args)
        else:
            from hpa_lightning.inference.predictor import run

            result = run(args)
    except UserError as err:  # bad arguments, data or model files, an untrusted _target_
        fail(err)
    if args["cells"]:
        _print_cells(result)
        return
    model: InferenceModel = result["model"]
    thresholds = (f"thresholds from {model.thresholds_source} (ensure_one={model.ensure_one})"
                  if model.thresholds_source else "threshold 0.5 (no thresholds.json)")
    rate = result["n"] / max(result["seconds"], 1e-9)
    print(f"model: {model.architecture} from {model.source} at {result['image_size']}px; {thresholds}\n"
          f"predicted {result['n']} samples (Ids from {result['ids_from']}) in {result['seconds']:.1f} s "
          f"({rate:.1f} samples/s, tta={result['tta']}"
          + (f" x {result['tta_crops']} crops" if result['tta_crops'] else "")
          + f" ({result['tta_reduce']}), device={result['device']})\n"
          f"wrote {result['out']} and {result['probabilities']}"
          + (f"\nskipped {result['n_incomplete']} incomplete Ids (not all four channel files), listed in "
             f"{result['incomplete']}" if result["n_incomplete"] else ""))


def _print_cells(result: dict[str, object]) -> None:
    models = [f"{role} model {m.architecture} from {m.source} at {m.image_size}px"
              for role, m in (("image", result["image_model"]), ("cell", result["cell_model"])) if m is not None]
    rate = result["cells"] / max(result["seconds"], 1e-9)
    print(f"{'; '.join(models)}\n"
          f"scored {result['cells']} cells of {result['images']} images (cell_score={result['method']}, Ids from "
          f"{result['ids_from']}) in {result['seconds']:.1f} s ({rate:.1f} cells/s, device={result['device']})\n"
          f"wrote {result['out']} ({result['triples']} label-cell triples) and {result['cells_csv']}"
          + (f"\nskipped {result['n_skipped']} images, listed in {result['skipped']}" if result["n_skipped"] else ""))


if __name__ == "__main__":
    main()
