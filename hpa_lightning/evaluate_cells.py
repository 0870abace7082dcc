"""Score an HPA 2021 single-cell submission against truth: `python -m hpa_lightning.evaluate_cells pred=CSV truth=CSV`.

    python -m hpa_lightning.evaluate_cells pred=submission.csv truth=TRUTH.csv [iou=0.6] [out=DIR]

Both files are the competition's CSV `ID,ImageWidth,ImageHeight,PredictionString` (triples `label confidence mask`,
hpa2021 class ids, masks as COCO RLE + zlib + base64; the truth's confidences are 1). The metric is the competition's:
mean over the classes that have truth of the average precision of cell masks at IoU >= `iou`, OpenImages style
(hpa_lightning/cells/average_precision.py; docs/cells.md).

Writes `out/cell_metrics.json` (mAP, per-class AP with class names, iou, counts of images, cells and detections),
written whole, and prints the mAP. A bad row, or an ID in one file and not the other, is one `error: ...` line
naming the file, row or ID, and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import UsageError, UserError

PROG = "hpa_lightning.evaluate_cells"
DEFAULTS: dict[str, object] = {"pred": None, "truth": None, "iou": 0.6, "out": "."}
METRICS_FILE = "cell_metrics.json"


def run(args: dict[str, object]) -> dict[str, object]:
    """Read both files, score, write `out/cell_metrics.json`; returns what was written."""
    from hpa_lightning.cells.average_precision import cell_metrics
    from hpa_lightning.cells.submission import read_submission
    from hpa_lightning.files import write_json_atomic

    for key in ("pred", "truth"):
        if not args[key]:
            raise UsageError(f"{PROG}: {key}= missing (pred=submission.csv truth=TRUTH.csv)")
    iou = float(args["iou"])  # type: ignore[arg-type]
    if not 0.0 < iou <= 1.0:
        raise UsageError(f"{PROG}: iou={iou} is not in (0, 1]")
    pred_path, truth_path = Path(str(args["pred"])), Path(str(args["truth"]))
    result = cell_metrics(read_submission(pred_path), read_submission(truth_path, truth=True), iou, str(pred_path),
                          str(truth_path))
    out = Path(str(args["out"]))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / METRICS_FILE, result)
    result["written"] = str(out / METRICS_FILE)
    return result


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv, DEFAULTS, PROG)
        result = run(args)
    except UserError as err:  # a bad command line, a bad row, IDs that differ between the files
        fail(err)
    scored = sum(entry["ap"] is not None for entry in result["per_class"])  # type: ignore[union-attr]
    value = "n/a (no class has truth)" if result["map"] is None else f"{result['map']:.6f}"
    print(f"mAP@IoU{result['iou']:g} {value} over {scored} classes with truth, {result['counts']['images']} images "
          f"({result['counts']['detections']} detections)\nwrote {result['written']}")


if __name__ == "__main__":
    main()
