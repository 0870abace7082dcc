"""`make demo-cells`: the HPA 2021 single-cell task end to end on synthetic cells with ground truth, on CPU.

    python -m hpa_lightning.demo_cells [out=DIR] [n=400] [test_n=60] [size=512] [zoom=0.7]
        [image_size=128] [cell_size=48] [epochs=6] [seed=0]

The steps are the commands a user types, each printed before it runs (docs/cells.md):

1. `synth classes=hpa2021 cells=true`: a training set and a held-out set (another seed), each with its cell masks
   and `cell_truth.csv`; kept in the cache (HPA_CACHE_DIR) for the next run.
2. `segment method=classical`: cell masks of both sets, as the 2021 teams made theirs (the true masks are only
   used to score).
3. `train data=hpa2021`: an image model on the image-level labels; `train data=hpa2021_cells`: a cell model on the
   crops of the segmented training cells, each with its image's labels.
4. `predict cells=... cell_score=image|cam|crop|blend` on the held-out images, then `evaluate_cells` of each against
   the held-out truth.

Everything goes to a new folder, `out` (default `outputs/demo_cells/<date>_<time>`; an existing one is refused). Prints
the cell mAP of each way and writes `out/cell_map.json`. Exit status 1 when a step fails (its last lines
printed), 2 for bad arguments.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import UsageError
from hpa_lightning.files import write_json_atomic

PROG = "hpa_lightning.demo_cells"
DEFAULTS: dict[str, object] = {"out": "", "n": 400, "test_n": 60, "size": 512, "zoom": 0.7,
                               "image_size": 128, "cell_size": 48, "epochs": 6, "seed": 0}
METHODS = ("image", "cam", "crop", "blend")
BASELINE = "image"
# The demo's recipe: the CPU preset (resnet10t from scratch, AdamW, cosine), no frozen epoch, no workers to spare.
TRAIN_ARGS = ("+preset=demo", "scheduler=cosine", "data.synthetic=null", "data.num_workers=2", "logger=csv")


def _step(title: str, module: str, args: list[str], env: dict[str, str]) -> str:
    command = [sys.executable, "-m", module, *args]
    print(f"\n== {title}\n$ python -m {module} {' '.join(shlex.quote(a) for a in args)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        print(tail, file=sys.stderr)
        print(f"error: step '{title}' failed (exit status {done.returncode})", file=sys.stderr)
        sys.exit(1)
    print(f"   ({time.perf_counter() - started:.0f} s) {done.stdout.strip().splitlines()[-1] if done.stdout else ''}")
    return done.stdout


def _dataset(cache: Path, kind: str, n: int, seed: int, size: int, zoom: float, env: dict[str, str]) -> Path:
    root = cache / "synthetic" / f"hpa2021-cells-{kind}-n{n}-seed{seed}-px{size}-zoom{zoom}"
    if not (root / "cell_truth.csv").is_file():
        _step(f"synthetic {kind} set", "hpa_lightning.synth",
              [f"out={root}", f"n={n}", f"seed={seed}", f"size={size}", f"zoom={zoom}", "classes=hpa2021",
               "cells=true"], env)
    return root


def run(args: dict[str, object]) -> dict[str, float]:
    out = Path(str(args["out"])).absolute()
    n, test_n, size, seed = int(args["n"]), int(args["test_n"]), int(args["size"]), int(args["seed"])
    zoom, epochs = float(args["zoom"]), int(args["epochs"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    cache = Path(env.get("HPA_CACHE_DIR", ".cache")).absolute()
    env["HPA_CACHE_DIR"] = str(cache)
    out.mkdir(parents=True)
    train_root = _dataset(cache, "train", n, seed, size, zoom, env)
    test_root = _dataset(cache, "test", test_n, seed + 1, size, zoom, env)
    masks = {name: out / f"{name}_masks" for name in ("train", "test")}
    for name, root in (("train", train_root), ("test", test_root)):
        _step(f"segment the {name} images", "hpa_lightning.segment",
              [f"input={root}", "image_dir=train", f"out={masks[name]}", "method=classical"], env)
    image_run, cell_run = out / "image_model", out / "cell_model"
    common = [*TRAIN_ARGS, f"trainer.max_epochs={epochs}", f"seed={seed}"]
    _step("train the image model", "hpa_lightning.train",
          [*common, "data=hpa2021", f"data.root={train_root}", f"data.image_size={args['image_size']}",
           f"hydra.run.dir={image_run}"], env)
    _step("train the cell model", "hpa_lightning.train",
          [*common, "data=hpa2021_cells", f"data.root={train_root}", f"data.cells={masks['train']}",
           f"data.image_size={args['cell_size']}", f"hydra.run.dir={cell_run}"], env)
    scores: dict[str, float] = {}
    for method in METHODS:
        submission = out / f"submission_{method}.csv"
        _step(f"predict every held-out cell, cell_score={method}", "hpa_lightning.predict",
              [f"ckpt={image_run}", f"cell_ckpt={cell_run}", f"input={test_root}", "image_dir=train",
               f"cells={masks['test']}", f"cell_score={method}", f"out={submission}", "progress=false"], env)
        _step(f"cell mAP of cell_score={method}", "hpa_lightning.evaluate_cells",
              [f"pred={submission}", f"truth={test_root / 'cell_truth.csv'}", f"out={out / f'eval_{method}'}"], env)
        scores[method] = float(json.loads((out / f"eval_{method}" / "cell_metrics.json").read_text())["map"])
    write_json_atomic(out / "cell_map.json", {"cell_map": scores, "train": str(train_root), "test": str(test_root),
                                               "image_model": str(image_run), "cell_model": str(cell_run)})
    return scores


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv, DEFAULTS, PROG)
        if int(args["n"]) < 20 or int(args["test_n"]) < 1:
            raise UsageError(f"{PROG}: n must be >= 20 and test_n >= 1")
        args["out"] = str(args["out"]) or time.strftime("outputs/demo_cells/%Y-%m-%d_%H-%M-%S")
        if Path(str(args["out"])).exists():
            raise UsageError(f"{PROG}: out={args['out']} already exists; the demo writes a new folder")
    except UsageError as err:
        fail(err)
    started = time.perf_counter()
    scores = run(args)
    best = max((m for m in METHODS if m != BASELINE), key=scores.__getitem__)
    print(f"\ncell mAP on the held-out synthetic cells (IoU 0.6), {time.perf_counter() - started:.0f} s in all:")
    for method in METHODS:
        note = " (copy the image labels to every cell)" if method == BASELINE else ""
        print(f"  {method:6s} {scores[method]:.4f}{note}")
    print(f"best: {best}, {scores[best] - scores[BASELINE]:+.4f} over the baseline; wrote {args['out']}/cell_map.json")


if __name__ == "__main__":
    main()
