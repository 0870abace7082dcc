"""Write a synthetic dataset in the Kaggle layout (see hpa_lightning/data/simulator/).

    python -m hpa_lightning.synth out=DIR [n=500] [seed=0] [size=128] [texture_noise=0.0] [zoom=1.0] [workers=N]
                                  [classes=hpa2018|hpa2021] [cells=false|true]

Prints the dataset's folder. `classes=hpa2018` (the default): Kaggle 2018's layout, `train.csv` (`Id,Target`) and
`train/{Id}_{red,green,blue,yellow}.png`. `classes=hpa2021`: HPA 2021's, `train.csv` (`ID,Label`, '|'-separated), the
2021 classes drawn by the 2018 patterns in a random subset of the cells; with `cells=true` also the cell and nuclei
masks (`masks/{ID}_cell_mask.png`, `masks/{ID}_nuclei_mask.png`, 16-bit labels) and the truth of every cell
(`cell_truth.csv`, the submission format with confidence 1; docs/data.md, data/simulator/single_cell.py). Realistic
2021 cells (about 200-400 px across at 2048 px) are `size=2048 zoom=0.35`.

The samples are byte-identical for given n, seed, size, texture_noise, zoom, classes and cells, whatever `workers` is
(default: every CPU available). An existing `out` is refused: the data are written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import sys

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import UsageError

PROG = "hpa_lightning.synth"
DEFAULTS: dict[str, object] = {"out": None, "n": 500, "seed": 0, "size": 128, "texture_noise": 0.0, "zoom": 1.0,
                               "workers": 0, "classes": "hpa2018", "cells": False}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; prints the dataset path. Exit status 2 for bad arguments or an existing ``out``."""
    from hpa_lightning.data.simulator.dataset import generate

    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv, DEFAULTS, PROG)
        if not args["out"]:
            raise UsageError(f"{PROG}: out=DIR is required")
        path = generate(str(args["out"]), n=int(args["n"]), seed=int(args["seed"]), size=int(args["size"]),
                        workers=int(args["workers"]) or None, texture_noise=float(args["texture_noise"]),
                        zoom=float(args["zoom"]), classes=str(args["classes"]), cells=bool(args["cells"]))
    except (UsageError, FileExistsError, ValueError) as err:
        fail(err)
    print(path)


if __name__ == "__main__":
    main()
