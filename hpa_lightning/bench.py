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

import csv
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpa_lightning.classes import CHANNELS
from hpa_lightning.cli import UsageError, fail, parse_key_values
from hpa_lightning.files import publish_folder, temporary_sibling, write_json_atomic, write_text_atomic
from hpa_lightning.pack import store_path
from hpa_lightning.resources import available_cpus
from hpa_lightning.sources import load_sample, read_label_table

SECTIONS = ("loading", "packing", "overhead", "augment", "gpu")
TARGETS = {"loading_speedup": (">=", 30.0), "framework_overhead": ("<=", 1.05), "pack_peak_rss_mb": ("<", 1536.0),
           "gpu_images_per_s": (">=", 900.0)}
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Profile:
    n: int  # samples of the 512 px data set (loading, packing)
    unique: int  # of which rendered; the rest are hard links under new ids
    size: int
    texture_noise: float
    load_batch: int
    load_png_samples: int  # the per-sample PNG loader runs over this many train samples
    load_min_seconds: float
    pack_rate_n: int  # the 1-worker vs all-cores rate comparison packs this many samples (both runs)
    ovh_n: int  # samples of the small data set of sections 3-4 (rendered at ovh_size)
    ovh_size: int
    ovh_batch: int
    ovh_model: str
    repeats: int
    warmup_steps: int
    aug_iters: int
    gpu_model: str
    gpu_size: int
    gpu_batch: int
    gpu_warmup: int
    gpu_steps: int
    gpu_compile: bool


PROFILES = {
    "full": Profile(n=2000, unique=500, size=512, texture_noise=1.0, load_batch=32, load_png_samples=448,
                    load_min_seconds=3.0, pack_rate_n=400, ovh_n=600, ovh_size=64, ovh_batch=32, ovh_model="resnet18",
                    repeats=3, warmup_steps=3, aug_iters=5, gpu_model="resnet50", gpu_size=512, gpu_batch=64,
                    gpu_warmup=15, gpu_steps=60, gpu_compile=True),
    "quick": Profile(n=48, unique=16, size=128, texture_noise=1.0, load_batch=8, load_png_samples=32,
                     load_min_seconds=0.3, pack_rate_n=24, ovh_n=120, ovh_size=32, ovh_batch=16, ovh_model="resnet18",
                     repeats=1, warmup_steps=1, aug_iters=2, gpu_model="resnet18", gpu_size=128, gpu_batch=16,
                     gpu_warmup=3, gpu_steps=10, gpu_compile=False),
}

log = logging.getLogger("hpa_lightning.bench")


def note(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------------------------------------------ data


def tiled_dataset(cache: Path, n: int, unique: int, size: int, texture_noise: float, workers: int) -> Path:
    """`n` samples at `size` px: `unique` rendered by hpa_lightning.synth, repeated as hard links under new ids."""
    from hpa_lightning.synth import generate

    unique = min(unique, n)
    rendered = cache / f"synth-n{unique}-px{size}-noise{texture_noise:g}"
    if not (rendered / "train.csv").is_file():
        note(f"rendering {unique} synthetic samples at {size} px (texture_noise={texture_noise:g}) into {rendered}")
        try:
            generate(rendered, n=unique, seed=0, size=size, workers=workers, texture_noise=texture_noise)
        except FileExistsError:
            pass  # a concurrent bench rendered it first
    if n == unique:
        return rendered
    target = cache / f"tiled-n{n}-{rendered.name}"
    if (target / "train.csv").is_file():
        return target
    tmp = temporary_sibling(target)
    (tmp / "train").mkdir(parents=True)
    try:
        table = read_label_table(rendered / "train.csv")
        rows = []
        for i in range(n):
            k, copy = i % unique, i // unique
            src_id = table.ids[k]
            new_id = src_id if copy == 0 else f"{src_id}-r{copy}"
            for channel in CHANNELS:
                src = rendered / "train" / f"{src_id}_{channel}.png"
                dst = tmp / "train" / f"{new_id}_{channel}.png"
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            rows.append((new_id, table.targets[k]))
        with open(tmp / "train.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["Id", "Target"])
            writer.writerows(rows)
        publish_folder(tmp, target, "train.csv")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def png_sizes(root: Path) -> dict[str, float]:
    sizes = {}
    for path in (root / "train").iterdir():
        stat = path.stat()
        sizes[stat.st_ino] = stat.st_size  # hard links counted once
    values = np.array(list(sizes.values()), dtype=np.float64) / 1024.0
    return {"files": int(len(values)), "mean_kb": float(values.mean()), "min_kb": float(values.min()),
            "max_kb": float(values.max())}


def subset_dataset(root: Path, n: int, parent: Path) -> Path:
    """A Kaggle folder holding the first `n` rows of `root` (its image folder linked, not copied)."""
    target = parent / f"{root.name}-first{n}"
    if (target / "train.csv").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    lines = (root / "train.csv").read_text().splitlines(keepends=True)
    link = target / "train"
    if not link.exists():
        link.symlink_to((root / "train").resolve(), target_is_directory=True)
    write_text_atomic(target / "train.csv", "".join(lines[: n + 1]))
    return target


# -------------------------------------------------------------------------------------------------- 1: loading


class PngDataset(Dataset):
    """The per-sample baseline: every item decodes its four PNGs (what most Kaggle kernels did)."""

    def __init__(self, image_dir: Path, ids: list[str], labels: np.ndarray, size: int):
        self.image_dir, self.ids, self.size = image_dir, ids, size
        self.labels = torch.from_numpy(labels.astype(np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = torch.from_numpy(load_sample(self.image_dir, self.ids[i], self.size))
        return {"image": image, "target": self.labels[i], "index": torch.tensor(i)}


def shutdown_workers(loader: Iterable) -> None:
    """Stop a loader's persistent workers now rather than at garbage collection."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def loader_rate(loader: DataLoader, warmup_batches: int, min_batches: int, min_seconds: float,
                max_epochs: int = 50) -> dict[str, float]:
    """Samples/s after `warmup_batches` (worker start-up, page cache), over at least `min_batches` and `min_seconds`.

    Epochs are chained (persistent workers) until both minima are reached.
    """
    started = time.perf_counter()
    first_batch_s = None
    batches = timed_batches = timed_samples = 0
    t0 = None
    for _ in range(max_epochs):
        for batch in loader:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - started
                if batch["image"].dtype != torch.uint8:
                    raise TypeError(f"expected uint8 batches, got {batch['image'].dtype}")
            batches += 1
            if t0 is None:
                if batches >= warmup_batches:
                    t0 = time.perf_counter()
                continue
            timed_batches += 1
            timed_samples += len(batch["image"])
            if timed_batches >= min_batches and time.perf_counter() - t0 >= min_seconds:
                break
        else:
            continue
        break
    elapsed = time.perf_counter() - t0 if t0 is not None else float("nan")
    return {"samples_per_s": timed_samples / elapsed if timed_samples else float("nan"), "timed_samples": timed_samples,
            "timed_batches": timed_batches, "seconds": elapsed, "first_batch_s": first_batch_s or float("nan")}


def bench_loading(root: Path, cache: Path, prof: Profile, workers: int) -> dict:
    from hpa_lightning.datamodule import HPADataModule

    def datamodule(worker_type: str) -> HPADataModule:
        dm = HPADataModule(root=str(root), image_size=prof.size, cache_dir=str(cache / "stores"),
                           batch_size=prof.load_batch, num_workers=workers, worker_type=worker_type,
                           persistent_workers=workers > 0)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    dm = datamodule("thread")
    train_rows = dm.datasets["train"].indices
    png_rows = train_rows[: prof.load_png_samples]
    png_set = PngDataset(root / dm.image_dir, dm.ids(png_rows), dm.store.labels[png_rows], prof.size)
    png_loader = DataLoader(png_set, batch_size=prof.load_batch, shuffle=True, drop_last=True, num_workers=workers,
                            pin_memory=dm.pin_memory, persistent_workers=workers > 0)
    warm = max(2, 2 * workers)
    note(f"loading: per-sample PNG loader over {len(png_set)} samples, {workers} worker processes")
    png = loader_rate(png_loader, warm, min_batches=max(2, len(png_loader) - warm), min_seconds=0.0)
    shutdown_workers(png_loader)
    rates = {}
    for worker_type, module in (("thread", dm), ("process", datamodule("process"))):
        loader = module.train_dataloader()
        note(f"loading: packed DataModule loader over {len(module.datasets['train'])} train samples, "
             f"{workers} {worker_type} workers")
        rates[worker_type] = loader_rate(loader, warm, min_batches=max(4, len(loader)),
                                         min_seconds=prof.load_min_seconds)
        shutdown_workers(loader)
    packed = rates["thread"]
    return {"ratio": packed["samples_per_s"] / png["samples_per_s"], "packed": packed, "png": png,
            "packed_process_workers": rates["process"],
            "process_ratio": rates["process"]["samples_per_s"] / png["samples_per_s"],
            "batch_size": prof.load_batch, "workers": workers, "image_size": prof.size,
            "store": str(dm.store.path), "train_samples": len(dm.datasets["train"]),
            "png_baseline_samples": len(png_set)}


# -------------------------------------------------------------------------------------------------- 2: packing

_PACK_CHILD = """
import json, resource, sys, time
spec = json.loads(sys.argv[1])
from hpa_lightning.pack import build_store
def cpu():
    ru_self, ru_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru_self.ru_utime + ru_self.ru_stime + ru_children.ru_utime + ru_children.ru_stime
cpu0 = cpu()
t0 = time.perf_counter()
store = build_store(spec["root"], spec["size"], spec["cache_dir"], workers=spec["workers"])
elapsed = time.perf_counter() - t0
cpu_s = cpu() - cpu0
ru_self, ru_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kb = lambda key: int(status.get(key, "0 kB").split()[0])
print(json.dumps({"seconds": elapsed, "samples": len(store), "store": str(store.path), "cpu_s": cpu_s,
                  "self_maxrss_kb": ru_self.ru_maxrss, "children_maxrss_kb": ru_children.ru_maxrss,
                  "vm_hwm_kb": kb("VmHWM")}))
"""


def _proc_rss_kb(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile + RssShmem) of one process in kB, (0, 0) when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def kb(key: str) -> int:
        return int(fields.get(key, "0 kB").split()[0])

    return kb("RssAnon"), kb("RssFile") + kb("RssShmem")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def pack_in_child(root: Path, size: int, workers: int, cache_dir: Path) -> dict:
    """build_store in a fresh interpreter (its own RSS), the process tree's RSS sampled every 50 ms meanwhile."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    spec = json.dumps({"root": str(root), "size": size, "cache_dir": str(cache_dir), "workers": workers})
    proc = subprocess.Popen([sys.executable, "-c", _PACK_CHILD, spec], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    peak_total = peak_anon = peak_main = 0
    linux = Path("/proc/self/status").is_file()
    while proc.poll() is None:
        if linux:
            tree = _descendants(proc.pid)
            rss = [_proc_rss_kb(pid) for pid in tree]
            peak_total = max(peak_total, sum(a + f for a, f in rss))
            peak_anon = max(peak_anon, sum(a for a, _ in rss))
            peak_main = max(peak_main, sum(_proc_rss_kb(proc.pid)))
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"packing child failed ({proc.returncode}): {err.strip()[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update({"workers": workers, "samples_per_s": result["samples"] / result["seconds"],
                   "cores_used": result["cpu_s"] / result["seconds"],
                   "tree_peak_rss_mb": peak_total / 1024, "tree_peak_anon_mb": peak_anon / 1024,
                   "main_peak_rss_mb": max(peak_main, result["vm_hwm_kb"]) / 1024,
                   "workers_peak_rss_mb": result["children_maxrss_kb"] / 1024})
    return result


def bench_packing(root: Path, cache: Path, prof: Profile, workers: int) -> dict:
    scratch = cache / f"pack-scratch-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        subset = subset_dataset(root, min(prof.pack_rate_n, prof.n), cache)
        runs = {}
        for label, w in (("one_worker", 1), ("all_cores", workers)):
            note(f"packing: {prof.pack_rate_n} samples at {prof.size} px with {w} worker(s)")
            runs[label] = pack_in_child(subset, prof.size, w, scratch / label)
        note(f"packing: all {prof.n} samples at {prof.size} px with {workers} workers (peak RSS)")
        full = pack_in_child(root, prof.size, workers, scratch / "full")
        # keep it as the loading section's store when that one is not packed yet (saves packing twice)
        keep = store_path(root, prof.size, cache / "stores")
        if not (keep / "meta.json").is_file():
            keep.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(full["store"], keep)
            except OSError:
                pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    one, many = runs["one_worker"], runs["all_cores"]
    store_mb = prof.n * len(CHANNELS) * prof.size * prof.size / 2**20
    return {"ratio": many["samples_per_s"] / one["samples_per_s"], "workers": workers, "one_worker": one,
            "all_cores": many, "full": full, "full_samples": prof.n, "rate_samples": prof.pack_rate_n,
            "store_mb": store_mb, "peak_rss_mb": full["tree_peak_rss_mb"]}


# ------------------------------------------------------------------------------------------------- 3: overhead


def project_recipe(model_name: str) -> dict:
    """Loss, optimizer and augmentation of the demo recipe, from the real configs (focal_g02 + preset demo)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from hpa_lightning.finetune import resolve_recipe

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=focal_g02", "+preset=demo"])

    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if node is not None else None

    return {"model": {**plain(cfg.model), "name": model_name, "pretrained": False, "compile": False},
            "loss": plain(cfg.loss), "optimizer": plain(cfg.optimizer), "augment": plain(cfg.augment),
            "lr_ratios": resolve_recipe(cfg.finetune.frozen_epochs, cfg.finetune.lr_ratios, pretrained=False)[1]}


def build_module(recipe: dict, mean: list[float], std: list[float], seed: int, **model_overrides):
    import lightning as L

    from hpa_lightning.module import HPAModule

    L.seed_everything(seed, verbose=False)
    return HPAModule(model={**recipe["model"], **model_overrides}, loss=recipe["loss"],
                     optimizer=recipe["optimizer"], scheduler=None, lr_ratios=recipe["lr_ratios"],
                     augment=recipe["augment"], mean=mean, std=std)


def _lightning_timer():
    import lightning as L

    class StepTimer(L.Callback):
        """Wall-clock stamps at the end of every training batch (after the optimizer step and logging hooks)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.stamps.append(time.perf_counter())

    return StepTimer()


def lightning_epoch(recipe: dict, dm, seed: int, limit_batches: int | float = 1.0) -> dict:
    import lightning as L

    module = build_module(recipe, *dm.stats, seed=seed)
    timer = _lightning_timer()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, max_epochs=1,
                        limit_train_batches=limit_batches, callbacks=[timer])
    L.seed_everything(seed, verbose=False)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    total = time.perf_counter() - t0
    shutdown_workers(dm_loader_of(trainer))
    return {"total_s": total, "stamps": timer.stamps}


def plain_epoch(recipe: dict, dm, seed: int, limit_batches: int | None = None) -> dict:
    """The same work without Lightning: seed, model, loader, optimizer, transform, loss, backward, step."""
    module = build_module(recipe, *dm.stats, seed=seed)
    t0 = time.perf_counter()
    loader = dm.train_dataloader()
    optimizer = module.configure_optimizers()
    module.train()
    seed_all(seed)
    stamps = []
    for step, batch in enumerate(loader):
        if limit_batches is not None and step >= limit_batches:
            break
        image = module.transform(batch["image"], train=True)
        loss = module.criterion(module(image), batch["target"])
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    total = time.perf_counter() - t0
    shutdown_workers(loader)
    return {"total_s": total, "stamps": stamps}


def seed_all(seed: int) -> None:
    import lightning as L

    L.seed_everything(seed, verbose=False)


def step_span(stamps: list[float]) -> tuple[float, list[float]]:
    """Time from the end of the first step to the end of the last, and the step intervals in between.

    Excludes the first step (worker start-up, first-batch latency) on both sides, so what is compared is the
    steady-state cost of an epoch's steps: data fetch + transform + forward/backward/step + the framework's hooks.
    """
    intervals = list(np.diff(stamps))
    return (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan"), intervals


def overhead_datamodule(cache: Path, prof: Profile, workers: int):
    from hpa_lightning.datamodule import HPADataModule

    root = tiled_dataset(cache, prof.ovh_n, prof.ovh_n, prof.ovh_size, 0.0, workers)
    dm = HPADataModule(root=str(root), image_size=prof.ovh_size, cache_dir=str(cache / "stores"),
                       batch_size=prof.ovh_batch, num_workers=workers, persistent_workers=workers > 0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def bench_overhead(dm, recipe: dict, prof: Profile, repeats: int, seed: int) -> dict:
    note(f"overhead: warm-up ({prof.warmup_steps} steps each)")
    lightning_epoch(recipe, dm, seed, limit_batches=prof.warmup_steps)
    plain_epoch(recipe, dm, seed, limit_batches=prof.warmup_steps)
    runs: dict[str, list[dict]] = {"lightning": [], "plain": []}
    for r in range(repeats):
        order = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")  # ABBA cancels linear drift
        for name in order:
            note(f"overhead: run {r + 1}/{repeats} {name}")
            run = lightning_epoch(recipe, dm, seed) if name == "lightning" else plain_epoch(recipe, dm, seed)
            span, intervals = step_span(run["stamps"])
            runs[name].append({"total_s": run["total_s"], "span_s": span, "steps": len(run["stamps"]),
                               "intervals": intervals})
    lit, pln = runs["lightning"], runs["plain"]
    steps = lit[0]["steps"]
    if any(run["steps"] != steps for run in lit + pln):
        raise RuntimeError(f"overhead: step counts differ: {[run['steps'] for run in lit + pln]}")
    lit_span, pln_span = median(r["span_s"] for r in lit), median(r["span_s"] for r in pln)
    lit_step = median(x for r in lit for x in r["intervals"])
    pln_step = median(x for r in pln for x in r["intervals"])
    return {"ratio": lit_span / pln_span, "per_step_median_ratio": lit_step / pln_step, "steps_per_epoch": steps,
            "repeats": repeats, "lightning_span_s": lit_span, "plain_span_s": pln_span,
            "lightning_step_ms": lit_step * 1e3, "plain_step_ms": pln_step * 1e3,
            "overhead_per_step_ms": (lit_span - pln_span) / max(1, steps - 1) * 1e3,
            "lightning_fit_total_s": median(r["total_s"] for r in lit),
            "plain_total_s": median(r["total_s"] for r in pln),
            "runs": {name: [{k: v for k, v in run.items() if k != "intervals"} for run in rs]
                     for name, rs in runs.items()},
            "model": recipe["model"]["name"], "image_size": prof.ovh_size, "batch_size": prof.ovh_batch,
            "optimizer": str(recipe["optimizer"]["_target_"]).rsplit(".", 1)[-1],
            "loss": str(recipe["loss"]["_target_"]).rsplit(".", 1)[-1], "train_samples": len(dm.datasets["train"])}


# -------------------------------------------------------------------------------------------------- 4: augment


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median seconds of `fn` over `iters` calls after one untimed call."""
    fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return median(times)


def bench_augment(module, batch: dict, device: torch.device, iters: int, amp_dtype: torch.dtype | None = None) -> dict:
    """The augmentation's time vs a whole training step (transform + forward + loss + backward + optimizer step)."""
    module = module.to(device).train()
    images = batch["image"].to(device)
    targets = batch["target"].to(device)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    transform = module.transform
    channels_last = getattr(module, "channels_last", False)

    def augment_only():
        with torch.no_grad():
            transform.augment(images.float().div_(255.0))

    def transform_no_augment():
        with torch.no_grad():
            transform(images, train=False)

    def step():
        x = transform(images, train=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = module.criterion(module(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t_aug = time_call(augment_only, device, iters * 2)
    t_std = time_call(transform_no_augment, device, iters * 2)
    t_step = time_call(step, device, iters)
    return {"ratio": t_aug / t_step, "augment_ms": t_aug * 1e3, "to_float_standardize_ms": t_std * 1e3,
            "step_ms": t_step * 1e3, "batch_size": int(images.shape[0]), "image_size": int(images.shape[-1]),
            "device": str(device), "model": module.hparams.model["name"]}


# ------------------------------------------------------------------------------------------------------- 5: gpu


class TimedIterable:
    """Wraps a DataLoader; records how long each `next()` blocked (the training loop waiting for data)."""

    def __init__(self, loader: DataLoader, waits: list[float]):
        self.loader, self.waits = loader, waits

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        iterator = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - t0)
            yield batch


def gpu_run(root: Path, cache: Path, prof: Profile, workers: int, recipe: dict, seed: int, compiled: bool,
            device: torch.device) -> dict:
    """One Lightning fit of `gpu_warmup + gpu_steps` steps fed by the real DataModule; the last `gpu_steps` timed.

    `device` is cuda in the benchmark; the test runs the same code on the CPU at tiny sizes.
    """
    import lightning as L

    from hpa_lightning.datamodule import HPADataModule

    waits: list[float] = []

    class TimedDataModule(HPADataModule):
        def train_dataloader(self):
            return TimedIterable(super().train_dataloader(), waits)

    dm = TimedDataModule(root=str(root), image_size=prof.gpu_size, cache_dir=str(cache / "stores"),
                         batch_size=prof.gpu_batch, num_workers=workers, persistent_workers=True)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(recipe, *dm.stats, seed=seed, name=prof.gpu_model, channels_last=True, compile=compiled)
    marks: dict[str, float] = {}
    total_steps = prof.gpu_warmup + prof.gpu_steps

    class Marks(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step  # optimizer steps done
            if step == prof.gpu_warmup:
                _sync(device)
                marks["start"] = time.perf_counter()
                marks["wait_index"] = len(waits)
            elif step == total_steps:
                _sync(device)
                marks["end"] = time.perf_counter()

    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, max_epochs=-1, max_steps=total_steps,
                        callbacks=[Marks()])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    total = time.perf_counter() - t0
    seconds = marks["end"] - marks["start"]
    # waits of steps warmup+1 .. total (the batch of step k is fetched before step k runs)
    measured_waits = waits[marks["wait_index"]: marks["wait_index"] + prof.gpu_steps]
    step_s = seconds / prof.gpu_steps
    wait_s = float(np.mean(measured_waits)) if measured_waits else float("nan")
    result = {"images_per_s": prof.gpu_steps * prof.gpu_batch / seconds, "step_ms": step_s * 1e3,
              "data_wait_ms": wait_s * 1e3, "data_wait_share": wait_s / step_s, "fit_total_s": total,
              "compiled": compiled}
    augment = None
    if not compiled:
        rows = list(range(min(prof.gpu_batch, len(dm.datasets["train"]))))
        stacked = dm.datasets["train"].__getitems__(rows)  # already a collated batch
        augment = bench_augment(module, stacked, device, iters=10 if device.type == "cuda" else 1,
                                amp_dtype=torch.bfloat16)
    shutdown_workers(dm_loader_of(trainer))
    return {**result, "augment": augment}


def dm_loader_of(trainer) -> DataLoader | None:
    combined = trainer.fit_loop._combined_loader
    if combined is None:
        return None
    loader = combined.flattened[0]
    return loader.loader if isinstance(loader, TimedIterable) else loader


def bench_gpu(root: Path, cache: Path, prof: Profile, workers: int, recipe: dict, seed: int,
              device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} (dry run)"
    runs = {}
    for compiled in (False, True) if prof.gpu_compile else (False,):
        note(f"gpu: {prof.gpu_model} at {prof.gpu_size} px, bf16-mixed, channels_last, compile={compiled}")
        runs["compiled" if compiled else "eager"] = gpu_run(root, cache, prof, workers, recipe, seed, compiled,
                                                            device)
    eager = runs["eager"]
    compiled = runs.get("compiled")
    best = max(r["images_per_s"] for r in runs.values())
    return {"device": name, "model": prof.gpu_model, "image_size": prof.gpu_size, "batch_size": prof.gpu_batch,
            "workers": workers, "eager": eager, "compiled": compiled,
            "compile_speedup": compiled["images_per_s"] / eager["images_per_s"] if compiled else None,
            "best_images_per_s": best, "data_wait_share": (compiled or eager)["data_wait_share"],
            "augment": eager.get("augment")}


# ---------------------------------------------------------------------------------------------------- report


def _fmt_target(key: str, value: float | None) -> tuple[str, bool | None]:
    op, bound = TARGETS[key]
    if not finite(value):
        return f"target {op} {bound:g}", None
    met = value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
    return f"target {op} {bound:g}", bool(met)


def render_report(result: dict) -> str:
    lines = []
    env = result["environment"]
    gpu_txt = env["gpu"] or "no GPU"
    lines.append(f"hpa_lightning benchmark ({result['mode']}): {env['cpus']} CPU cores, torch {env['torch']}, "
                 f"lightning {env['lightning']}, kornia {env['kornia']}, {gpu_txt}")
    lines.append(f"load average {env['loadavg_start']} at start, {env['loadavg_end']} at end; {result['workers']} "
                 f"loader workers; torch threads in the CPU training sections: {result['cpu_threads']}")
    data = result.get("data") or {}
    if data:
        png = data["png"]
        lines.append(f"data: {data['n']} samples at {data['size']} px ({data['unique']} rendered, the rest "
                     f"hard links), texture_noise={data['texture_noise']:g}; mean PNG {png['mean_kb']:.1f} KB per "
                     f"channel (min {png['min_kb']:.1f}, max {png['max_kb']:.1f}, {png['files']} files)")
    lines.append("")
    lines.append("RATIOS (measured side by side in this run)")
    s = result["sections"]
    verdicts = result["targets"]

    def verdict(key: str) -> str:
        v = verdicts.get(key)
        if v is None:
            return ""
        return f"[{v['target']}: {'MET' if v['met'] else 'MISSED' if v['met'] is False else 'n/a'}]"

    def row(num: str, name: str, value: str, text: str, tail: str = "") -> None:
        lines.append(f"  {num} {name:<9} {value:>8}  {text:<62} {tail}".rstrip())

    if "loading" in s:
        x = s["loading"]
        row("1", "loading", f"{x['ratio']:.1f}x", "packed DataModule / per-sample PNG decoding, samples/s",
            verdict("loading_speedup"))
    if "packing" in s:
        x = s["packing"]
        row("2", "packing", f"{x['ratio']:.2f}x", f"{x['workers']} workers / 1 worker, samples/s (ideal "
            f"{x['workers']}x)", f"peak RSS {x['peak_rss_mb']:.0f} MB {verdict('pack_peak_rss_mb')}")
    if "overhead" in s:
        x = s["overhead"]
        row("3", "overhead", f"{x['ratio']:.3f}", f"Lightning / plain PyTorch, one epoch (median of {x['repeats']})",
            verdict("framework_overhead"))
        row(" ", "", f"{x['per_step_median_ratio']:.3f}", "  the same, median step time")
    if "augment" in s:
        x = s["augment"]
        row("4", "augment", f"{100 * x['ratio']:.1f}%", f"kornia augmentation / training step ({x['headline']})")
    if "gpu" in s:
        x = s["gpu"]
        if x.get("skipped"):
            lines.append(f"  5 gpu       skipped: {x['skipped']}")
        else:
            row("5", "gpu", f"{100 * x['data_wait_share']:.1f}%", "waiting for data / step time",
                f"best {x['best_images_per_s']:.0f} images/s {verdict('gpu_images_per_s')}")
            if x.get("compile_speedup") is not None:
                row(" ", "", f"{x['compile_speedup']:.2f}x", "model.compile / eager, images/s")
    for name, err in result.get("errors", {}).items():
        lines.append(f"  ! {name}: FAILED: {err}")

    lines.append("")
    lines.append("ABSOLUTE FIGURES (noisy on a shared machine; compare ratios)")
    if "loading" in s:
        x = s["loading"]
        p, q = x["packed"], x["png"]
        lines.append(f"  1 loading   batch {x['batch_size']}, {x['workers']} workers, {x['image_size']} px uint8:")
        for label, rate in (("packed store, threads (default)", p),
                            ("packed store, worker processes", x.get("packed_process_workers")),
                            ("PNG decode, worker processes", q)):
            if rate:
                lines.append(f"              {label:<32}{rate['samples_per_s']:8.1f} samples/s "
                             f"({rate['timed_samples']} samples in {rate['seconds']:.2f} s; "
                             f"first batch after {rate['first_batch_s']:.2f} s)")
    if "packing" in s:
        x = s["packing"]
        one, many, full = x["one_worker"], x["all_cores"], x["full"]
        lines.append(f"  2 packing   {x['rate_samples']} samples: 1 worker {one['samples_per_s']:.1f} samples/s "
                     f"(busy cores {one['cores_used']:.2f}), {x['workers']} workers {many['samples_per_s']:.1f} "
                     f"samples/s (busy cores {many['cores_used']:.2f})")
        lines.append("              (busy cores = CPU time / wall time of the packing processes: below the worker "
                     "count when other jobs share the cores)")
        lines.append(f"              {x['full_samples']} samples ({x['store_mb']:.0f} MB store) with {x['workers']} "
                     f"workers: {full['samples_per_s']:.1f} samples/s, {full['seconds']:.1f} s "
                     f"(busy cores {full['cores_used']:.2f})")
        for label, run in (("1 worker", one), (f"{x['workers']} workers", many),
                           (f"{x['full_samples']} samples", full)):
            lines.append(f"              peak RSS {label:<13} all processes {run['tree_peak_rss_mb']:6.0f} MB "
                         f"(anonymous {run['tree_peak_anon_mb']:5.0f}); packer VmHWM {run['main_peak_rss_mb']:5.0f} "
                         f"MB; decode worker {run['workers_peak_rss_mb']:4.0f} MB")
    if "overhead" in s:
        x = s["overhead"]
        lines.append(f"  3 overhead  {x['model']} at {x['image_size']} px, batch {x['batch_size']}, {x['optimizer']}, "
                     f"{x['loss']}, augmentation on, {x['steps_per_epoch']} steps/epoch, {x['repeats']} alternating "
                     f"runs each:")
        lines.append(f"              steps 2..{x['steps_per_epoch']}: Lightning {x['lightning_span_s']:.2f} s, plain "
                     f"{x['plain_span_s']:.2f} s ({x['overhead_per_step_ms']:+.1f} ms/step); median step "
                     f"{x['lightning_step_ms']:.1f} vs {x['plain_step_ms']:.1f} ms")
        lines.append(f"              whole call: trainer.fit {x['lightning_fit_total_s']:.2f} s, plain loop "
                     f"{x['plain_total_s']:.2f} s (loader start-up and fit's fixed setup included)")
    if "augment" in s:
        for where, x in s["augment"]["by_device"].items():
            lines.append(f"  4 augment   {where}: augmentation {x['augment_ms']:.1f} ms, to-float+standardise "
                         f"{x['to_float_standardize_ms']:.1f} ms, training step {x['step_ms']:.1f} ms "
                         f"({x['model']}, batch {x['batch_size']}, {x['image_size']} px)")
    if "gpu" in s and not s["gpu"].get("skipped"):
        x = s["gpu"]
        lines.append(f"  5 gpu       {x['device']}: {x['model']} at {x['image_size']} px, batch {x['batch_size']}, "
                     f"{x['workers']} loader workers")
        for label in ("eager", "compiled"):
            r = x.get(label)
            if r:
                lines.append(f"              {label:<9} {r['images_per_s']:7.1f} images/s, step {r['step_ms']:.1f} ms, "
                             f"waiting for data {r['data_wait_ms']:.2f} ms/step ({100 * r['data_wait_share']:.1f}%)")
        lines.append(f"              best {x['best_images_per_s']:.1f} images/s {verdict('gpu_images_per_s')}")
    notes = diagnostics(result)
    if notes:
        lines.append("")
        lines.append("NOTES")
        for n in notes:
            lines.extend(textwrap.wrap(n, width=118, initial_indent="  - ", subsequent_indent="    "))
    lines.append("")
    lines.append(f"total wall time {result['wall_s']:.1f} s; JSON: {result['out']}")
    return "\n".join(lines)


def diagnostics(result: dict) -> list[str]:
    """Plain-language reasons behind figures that are easy to misread."""
    notes = []
    s = result["sections"]
    packing = s.get("packing")
    if packing:
        full = packing["full"]
        if full["tree_peak_rss_mb"] > 2 * max(full["tree_peak_anon_mb"], 1.0):
            notes.append(f"packing RSS is mostly file pages of the store's memory map (images.npy written through "
                         f"open_memmap stays mapped, so RSS grows with the store: {packing['store_mb']:.0f} MB here); "
                         f"anonymous memory peaked at {full['tree_peak_anon_mb']:.0f} MB")
        many = packing["all_cores"]
        if packing["workers"] > 1 and many["cores_used"] < 0.8 * packing["workers"]:
            notes.append(f"the {packing['workers']}-worker packing got {many['cores_used']:.2f} busy cores (load "
                         f"average {result['environment']['loadavg_start']}): other jobs share the cores, so the "
                         f"parallel speedup is understated")
    overhead = s.get("overhead")
    if overhead and abs(overhead["ratio"] - overhead["per_step_median_ratio"]) > 0.03:
        notes.append("the epoch and median-step overhead ratios differ by more than 3 %: step times were noisy "
                     "(shared cores); rerun with repeats=5 for a tighter figure")
    return notes


def collect_targets(sections: dict) -> dict:
    values = {
        "loading_speedup": sections.get("loading", {}).get("ratio"),
        "framework_overhead": sections.get("overhead", {}).get("ratio"),
        "pack_peak_rss_mb": sections.get("packing", {}).get("peak_rss_mb"),
        "gpu_images_per_s": sections.get("gpu", {}).get("best_images_per_s"),
    }
    targets = {}
    for key, value in values.items():
        if value is None:
            continue
        text, met = _fmt_target(key, value)
        targets[key] = {"value": value, "target": text, "met": met}
    return targets


def headline_ratios(sections: dict) -> dict:
    gpu = sections.get("gpu", {})
    return {
        "loading_speedup": sections.get("loading", {}).get("ratio"),
        "packing_speedup": sections.get("packing", {}).get("ratio"),
        "framework_overhead": sections.get("overhead", {}).get("ratio"),
        "augment_share": sections.get("augment", {}).get("ratio"),
        "gpu_compile_speedup": gpu.get("compile_speedup"),
        "gpu_data_wait_share": gpu.get("data_wait_share"),
    }


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
    wanted = SECTIONS if args["sections"] in ("", "all") else tuple(args["sections"].split(","))
    unknown = [w for w in wanted if w not in SECTIONS]
    if unknown:
        raise UsageError(f"hpa_lightning.bench: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    cache.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    seed = int(args["seed"])
    cpu_threads = int(args["threads"]) or torch.get_num_threads()
    result: dict = {"mode": mode, "profile": asdict(prof), "workers": workers, "cpu_threads": cpu_threads,
                    "cache": str(cache), "out": str(out), "environment": environment(), "sections": {},
                    "errors": {}}
    sections = result["sections"]

    data_root = None
    if {"loading", "packing", "gpu"} & set(wanted):
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


DEFAULTS: dict[str, object] = {"quick": False, "out": "", "cache": "", "workers": 0, "repeats": 0, "seed": 0,
                               "threads": 1, "gpu": True, "sections": "all"}


def main(argv: list[str] | None = None) -> dict:
    try:
        result = run(parse_key_values(sys.argv[1:] if argv is None else argv, DEFAULTS, "hpa_lightning.bench"))
    except UsageError as err:
        fail(err)
    print(render_report(result), flush=True)
    if result["errors"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
