"""Where each label comes from: class activation maps of a trained model over the RGB composites of images.

    python -m hpa_lightning.explain ckpt=RUN_DIR|CKPT|EXPORT_DIR input=DIR [ids=ID1,ID2] [classes=predicted|top3|0,25]
        [out=explain] [method=auto|cam|gradcam] [limit=16] [image_dir=test] [device=auto] [sixteen_bit=divide]
        [cells=MASKS|classical] [cell_labels=3] [segment_scale=0.25]

Input is a folder as for predict (Kaggle layout or {Id}_{channel} files). For each image (the `ids`, else the
first `limit`), the chosen classes (`predicted`: those at or above the run's thresholds; `topK`; or class ids) get
a map: CAM where the head is a linear layer after average pooling, Grad-CAM otherwise (hpa_lightning/reporting/cam.py).
`out` gets `<Id>_rgb.png`, `<Id>_classNN.png` (the map over the composite) and `index.html` to open in a
browser. With `cells=` (a folder of cell masks, or `classical` to segment here; docs/cells.md), `<Id>_cells.png`
also shows every cell's outline and its `cell_labels` top labels by cam score, as `predict cell_score=cam` scores
them. Bad input is one `error: ...` line and exit status 2; `out` is written complete or not at all.
"""

from __future__ import annotations

import sys

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.data.sources import KAGGLE_IMAGE_DIR
from hpa_lightning.errors import UserError

PROG = "hpa_lightning.explain"
DEFAULTS: dict[str, object] = {"ckpt": None, "input": None, "out": "explain", "ids": "", "classes": "predicted",
                               "method": "auto", "limit": 16, "image_dir": KAGGLE_IMAGE_DIR, "device": "auto",
                               "sixteen_bit": "", "trust": "", "cells": "", "cell_labels": 3, "segment_scale": 0.25}


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv, DEFAULTS, PROG)
        # imported only now (torch, timm), so that --help and a mistyped key answer at once
        from hpa_lightning.reporting.cam import explain

        result = explain(args)
    except UserError as err:  # bad arguments, data or model files, an untrusted _target_
        fail(err)
    print(f"explained {result['images']} images ({result['maps']} class maps, {', '.join(result['methods'])}) with "
          f"{result['model'].architecture} from {result['model'].source}\nopen {result['index']}")


if __name__ == "__main__":
    main()
