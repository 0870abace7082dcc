"""Speed benchmark of the input pipeline and the training loop, measured side by side in one run.

    python -m hpa_lightning.bench               # full: 2000 samples of 512 px, < 10 min on 2 CPU cores
    python -m hpa_lightning.bench quick=true    # tiny sizes, < 60 s (what the test runs)

Sections (each prints a ratio of two things measured in the same run, same data, same worker count):
  1 loading   samples/s of HPADataModule.train_dataloader() over the packed store vs a per-sample loader that decodes
              the four PNGs of every sample (the common Kaggle-kernel Dataset), same batch size and workers
  2 packing   build_store() samples/s with all cores vs 1 worker, and the peak RSS of packing (child processes)
  3 overhead  one epoch through lightning.Trainer + HPAModule + HPADataModule vs a plain PyTorch loop doing the same
              work (same model, loader, optimizer groups, DeviceTransform, loss); median of alternating runs
  4 augment   the kornia augmentation as a share of a training step (CPU; also on the GPU when there is one)
  5 gpu       ResNet50 at 512 px, bf16-mixed, channels_last, eager and model.compile: images/s and data wait per step
  6 jpeg      per-sample decoding of HPAv18-like 2048 px RGB JPGs to 512 px as the packer does it (DCT scaling straight
              to the size) vs a plain full-decode loop and the rule before (draft-x2), alternating rounds over the same
              files on one core; how close each is to the box-filtered full decode
  7 thresholds  the exact per-class threshold search (metrics.tune_thresholds) vs sklearn's precision-recall curve
              per class, 3107 x 28 (a Kaggle-sized validation split); both must find the same F1
  8 segment   classical cell segmentation per 2048 px image at scale 0.25 on one core, seconds per image (synthetic
              images with the simulator's cells at HPA 2021 geometry; the goal is at most 0.5 s)
  9 cells     per-cell prediction: cells/s of each cell_score (image, cam, crop, blend) over the same images and
              masks; the ratio is blend's time over the image-level pass copied to every cell
  10 stream   the streaming store (litdata): a local streaming folder's training loader vs the memmap store's (same
              samples, batch size, workers; goal >= 0.8) and the same chunk files copied without litdata (the
              format's ceiling), and one epoch streamed from a loopback S3 server vs a plain GET loop over the same
              chunk objects (goal >= 0.5)

Generated data live in `cache` (default $HPA_CACHE_DIR/bench or .cache/bench), so reruns skip generation. The full
mode renders `unique` samples and hard-links them under new ids up to `n` (decoding cost is per file, so packing and
loading cost the same as with n distinct samples; rendering 2000 512 px samples alone would take ~5 min on 2 cores).

Args (key=value): quick, out (JSON report; default outputs/bench/bench-<mode>.json), cache, workers (loader and
packing workers; 0: the CPUs this process may use), repeats (0: the mode's default), seed, threads (torch intra-op
threads of the CPU training sections 3-4; 0: torch's default), gpu (false skips section 5), sections (comma list).

threads defaults to 1: with 2 OpenMP threads on 2 cores that are shared with loader workers (or other jobs), every
parallel region waits for a descheduled thread, and a resnet18 step at 32-64 px took 3-10x longer and varied +-50 %
from step to step, drowning the few-percent difference section 3 is after. Both sides of every ratio use the same.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hpa_lightning.bench.augment_speed import bench_augment
from hpa_lightning.bench.bench_data import png_sizes, tiled_dataset
from hpa_lightning.bench.cell_prediction_speed import bench_cell_prediction
from hpa_lightning.bench.common import PROFILES, Profile, note
from hpa_lightning.bench.gpu_speed import bench_gpu
from hpa_lightning.bench.jpeg import bench_jpeg
from hpa_lightning.bench.loading import bench_loading
from hpa_lightning.bench.options import parse_arguments
from hpa_lightning.bench.overhead import bench_overhead, build_module, overhead_datamodule, project_recipe
from hpa_lightning.bench.packing_speed import bench_packing
from hpa_lightning.bench.segmentation_speed import bench_segmentation
from hpa_lightning.bench.stream_speed import bench_stream
from hpa_lightning.bench.summary import collect_targets, headline_ratios, render_report
from hpa_lightning.bench.thresholds import bench_thresholds
from hpa_lightning.cli import fail
from hpa_lightning.errors import UsageError
from hpa_lightning.files import write_json_atomic
from hpa_lightning.machine import available_cpus

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    import lightning.pytorch  # noqa: F401 - it sets its loggers to INFO on import; lower them afterwards

    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                    ".*`max_epochs` was not set.*", ".*GPU available but not used.*", ".*LeafSpec.*",
                    ".*Checkpoint directory.*", ".*precision.*is supported.*",
                    ".*overridden `on_after_batch_transfer`.*"):
        warnings.filterwarnings("ignore", message=pattern)


def environment() -> dict:
    import kornia
    import lightning

    return {"cpus": available_cpus(), "torch": torch.__version__, "lightning": lightning.__version__,
            "kornia": kornia.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_start": _loadavg()}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run(args: dict) -> dict:
    started = time.perf_counter()
    mode = "quick" if args["quick"] else "full"
    prof = PROFILES[mode]
    if args["repeats"]:
        prof = Profile(**{**asdict(prof), "repeats": int(args["repeats"])})
    workers = int(args["workers"]) or available_cpus()
    cache = Path(args["cache"] or Path(os.environ.get("HPA_CACHE_DIR", ".cache")) / "bench")
    out = Path(args["out"] or Path("outputs") / "bench" / f"bench-{mode}.json")
    wanted = args["sections"]
    cache.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    seed = int(args["seed"])
    cpu_threads = int(args["threads"]) or torch.get_num_threads()
    result: dict = {"mode": mode, "profile": asdict(prof), "workers": workers, "cpu_threads": cpu_threads,
                    "cache": str(cache), "out": str(out), "environment": environment(), "sections": {},
                    "errors": {}}
    sections = result["sections"]

    data_root = None
    if {"loading", "packing", "gpu", "stream"} & set(wanted):
        data_root = tiled_dataset(cache, prof.n, prof.unique, prof.size, prof.texture_noise, workers)
        result["data"] = {"root": str(data_root), "n": prof.n, "unique": min(prof.unique, prof.n), "size": prof.size,
                          "texture_noise": prof.texture_noise, "png": png_sizes(data_root)}

    def attempt(name: str, fn: Callable[[], dict]) -> None:
        try:
            sections[name] = fn()
        except Exception as err:  # one failing section must not hide the others' figures
            log.exception("section %s failed", name)
            result["errors"][name] = f"{type(err).__name__}: {err}"

    # packing first: its full-size store becomes the loading section's store on a first run
    if "packing" in wanted:
        attempt("packing", lambda: bench_packing(data_root, cache, prof, workers))
    if "loading" in wanted:
        attempt("loading", lambda: bench_loading(data_root, cache, prof, workers))
    if "jpeg" in wanted:
        # its few samples from the sections' data when rendered anyway, else rendered alone (seconds, not minutes)
        jpeg_source = data_root or tiled_dataset(cache, prof.jpeg_samples, prof.jpeg_samples, prof.size,
                                                 prof.texture_noise, workers)
        attempt("jpeg", lambda: bench_jpeg(jpeg_source, cache, prof))
    recipe = None
    if {"overhead", "augment", "gpu"} & set(wanted):
        recipe = project_recipe(prof.ovh_model)
    if {"overhead", "augment"} & set(wanted):
        dm = overhead_datamodule(cache, prof, workers)
        default_threads = torch.get_num_threads()
        torch.set_num_threads(cpu_threads)
        if "overhead" in wanted:
            attempt("overhead", lambda: bench_overhead(dm, recipe, prof, prof.repeats, seed))
        if "augment" in wanted:
            def augment_cpu() -> dict:
                note("augment: CPU")
                rows = list(range(min(prof.ovh_batch, len(dm.datasets["train"]))))
                batch = dm.datasets["train"].__getitems__(rows)  # already a collated batch
                module = build_module(recipe, *dm.stats, seed=seed)
                cpu = bench_augment(module, batch, torch.device("cpu"), prof.aug_iters)
                return {"ratio": cpu["ratio"], "headline": "cpu", "by_device": {"cpu": cpu}}

            attempt("augment", augment_cpu)
        torch.set_num_threads(default_threads)
    if "gpu" in wanted:
        if not args["gpu"]:
            sections["gpu"] = {"skipped": "gpu=false"}
        elif not torch.cuda.is_available():
            sections["gpu"] = {"skipped": "torch.cuda.is_available() is False (no CUDA device): section 5 not run"}
        else:
            attempt("gpu", lambda: bench_gpu(data_root, cache, prof, workers, recipe, seed))
            gpu_aug = sections.get("gpu", {}).get("augment")
            if gpu_aug and "augment" in sections:
                sections["augment"]["by_device"]["gpu"] = gpu_aug
                sections["augment"]["ratio"] = gpu_aug["ratio"]
                sections["augment"]["headline"] = f"gpu, {gpu_aug['model']} {gpu_aug['image_size']} px bf16"
    if "thresholds" in wanted:
        attempt("thresholds", lambda: bench_thresholds(3107, 28, prof.thr_iters, seed))
    if "segment" in wanted:
        attempt("segment", lambda: bench_segmentation(prof, seed))
    if "cells" in wanted:
        attempt("cells", lambda: bench_cell_prediction(prof, seed, cache))
    if "stream" in wanted:
        attempt("stream", lambda: bench_stream(data_root, cache, prof, workers))
    result["environment"]["loadavg_end"] = _loadavg()
    result["ratios"] = headline_ratios(sections)
    result["targets"] = collect_targets(sections)
    result["wall_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, _jsonable(result))
    return result


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: list[str] | None = None) -> dict:
    try:
        result = run(parse_arguments(sys.argv[1:] if argv is None else argv))
    except UsageError as err:
        fail(err)
    print(render_report(result), flush=True)
    if result["errors"]:
        raise SystemExit(1)
    return result
