"""The one-call GPU acceptance check (usage: hpa_lightning/gpu_check.py), written so that one lent run counts.

Parts, in this order, each recorded whatever the others did:
  bench     ResNet50 at 512 px, bf16-mixed, channels_last, cudnn.benchmark, fed by the real DataModule, in this
            process: eager at batch 32, 64, ... until memory or images/s stops growing; per size the median step
            and its spread over timed windows, images/s, host reads per step, data wait, peak memory
  train     `+experiment=focal_g02 trainer=gpu`, one epoch at 512 px on synthetic data (from scratch: no hub there)
  predict   the trained run with `tta=8` on held-out synthetic images (skipped when train failed)
  sweep     two learning rates under `hydra/launcher=gpu_pool`, each job on a GPU of its own claim
  compiled  `model.compile` at the eager size with the best images/s, in a process of its own (a compiler crash or
            hang costs only this part)
  bundle    (rehearsal only) the device bundle read off the rehearsal's imports (hpa_lightning/bench/device_wheels.py)

One deadline for the whole check (budget_s): each part gets what is left after the least the later parts need, a
part that cannot get its least is recorded as skipped. gpu_check.json and summary.txt are rewritten after every batch
size and every part, so a run stopped at its limit still returns what it measured; SIGTERM writes and exits 143.
`rehearse=true` runs the same sequence on the CPU at tiny sizes (`make test` does): no CUDA is an error otherwise.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from hpa_lightning import SOURCE_ROOT
from hpa_lightning.bench.check_runner import CheckReport, Deadline, describe, is_out_of_memory
from hpa_lightning.bench.gpu_speed import Windows

ORDER = ("bench", "train", "predict", "sweep", "compiled")


class NoCudaError(RuntimeError):
    """gpu-check needs a CUDA device and there is none."""


@dataclass(frozen=True)
class CheckSettings:
    device: str  # cuda | cpu (the rehearsal)
    model: str
    image_size: int
    first_batch: int
    max_batch: int
    windows: Windows
    bench_n: int  # samples of the benchmark's data set, `bench_unique` of them rendered, the rest hard links
    bench_unique: int
    train_n: int  # synthetic samples of the train part; the sweep's jobs use `sweep_samples` of them
    sweep_samples: int
    held_out_n: int
    trainer: str
    overrides: tuple[str, ...]  # added to the train and sweep command lines
    compile_backend: str | None  # None: inductor, as `compile: true` trains; the rehearsal's `eager`: dynamo's
    # tracing of the model (where model code breaks) without generating code
    budget_s: float
    needs_s: dict[str, float] = field(default_factory=dict)  # the least time each part is started with
    growth: float = 1.03  # a larger batch counts as faster when it beats the best images/s so far by 3 %
    threads: int | None = None  # CPU threads of every process (the rehearsal: 1, fastest for tiny work on busy cores)


GPU = CheckSettings(device="cuda", model="resnet50", image_size=512, first_batch=32, max_batch=1024,
                    windows=Windows(count=3, min_steps=20, min_seconds=5.0, warmup_steps=10), bench_n=2000,
                    bench_unique=500, train_n=1000, sweep_samples=400, held_out_n=16, trainer="gpu", overrides=(),
                    compile_backend=None, budget_s=420.0,
                    needs_s={"bench_size": 25.0, "train": 60.0, "predict": 20.0, "sweep": 60.0, "compiled": 90.0})
# timm's test_resnet: a ResNet of 0.4 M parameters, 7x faster than resnet10t here, with the same layers and head
REHEARSAL = CheckSettings(device="cpu", model="test_resnet", image_size=32, first_batch=2, max_batch=8,
                          windows=Windows(count=2, min_steps=2, min_seconds=0.05, warmup_steps=1), bench_n=48,
                          bench_unique=16, train_n=40, sweep_samples=24, held_out_n=4, trainer="cpu",
                          overrides=("model.name=test_resnet", "data.batch_size=8", "data.num_workers=0",
                                     "++trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"),
                          compile_backend="eager", budget_s=300.0, threads=1,
                          needs_s={"bench_size": 2.0, "train": 10.0, "predict": 5.0, "sweep": 10.0, "compiled": 10.0})


def require_cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        raise NoCudaError(f"gpu-check needs a CUDA GPU and torch {torch.__version__} sees none (CUDA build "
                          f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                          f"`rehearse=true` runs it on the CPU")
    return torch.cuda.get_device_name(0)


def plan(out: Path, settings: CheckSettings = GPU) -> dict[str, list[str]]:
    """The command lines of the train, sweep and predict parts (module arguments after `python -m`). The sweep's
    jobs train on a subset of the train part's data: the same folder and store, nothing rendered or packed again."""
    synthetic = [f"data.synthetic.n={settings.train_n}", f"data.synthetic.size={settings.image_size}",
                 "data.synthetic.zoom=1.0", f"data.image_size={settings.image_size}", "model.pretrained=false",
                 f"paths.cache_dir={out / 'cache'}", *settings.overrides]
    common = ["+experiment=focal_g02", f"trainer={settings.trainer}", "trainer.max_epochs=1",
              "finetune.frozen_epochs=0"]
    return {
        "train": ["hpa_lightning.train", *common, *synthetic, f"hydra.run.dir={out / 'train'}"],
        "predict": ["hpa_lightning.predict", f"ckpt={out / 'train'}", f"input={out / 'held_out'}", "tta=8",
                    f"out={out / 'predict' / 'submission.csv'}", "progress=false"],
        "sweep": ["hpa_lightning.train", "-m", *common, "hydra/launcher=gpu_pool", "optimizer.lr=0.01,0.02",
                  *synthetic, f"data.max_samples={settings.sweep_samples}", f"hydra.sweep.dir={out / 'sweep'}"],
    }


def part_environment(settings: CheckSettings) -> dict[str, str]:
    """The parts' processes: this checkout first on PYTHONPATH (an installed copy elsewhere must not answer), offline,
    output unbuffered (a part killed at its time still leaves its last lines), the sweep's GPU pool."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(SOURCE_ROOT)) if p)
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if settings.threads:
        env["OMP_NUM_THREADS"] = str(settings.threads)
    env.setdefault("WANDB_MODE", "disabled")
    if settings.device == "cuda":
        import torch

        env["HPA_NUM_GPUS"] = str(max(1, torch.cuda.device_count()))
        env.pop("HPA_SIMULATE_GPUS", None)
    else:
        env["HPA_SIMULATE_GPUS"] = "1"
        env.pop("HPA_NUM_GPUS", None)
    return env


def free_device_memory(device_type: str) -> dict:
    """Called after a size has returned or failed, outside any except block: the traceback that held its frames
    (module, trainer, activations) is gone, gc breaks Lightning's reference cycles, then the cache goes back."""
    gc.collect()
    if device_type != "cuda":
        return {}
    import torch

    torch.cuda.empty_cache()
    return {"reserved_after_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
            "allocated_after_gib": round(torch.cuda.memory_allocated() / 2**30, 2)}


def measure(run_one: Callable[[int], dict], batch: int, device_type: str,
            clock: Callable[[], float] = time.monotonic) -> dict:
    """One batch size: its figures, or its error (out of memory told apart); memory freed either way."""
    started = clock()
    result: dict = {}
    try:
        result = {"status": "ok", **run_one(batch)}
    except Exception as err:  # one size failing must not end the check
        result = {"status": "failed", "error": describe(err), "out_of_memory": is_out_of_memory(err)}
    return {**result, "seconds": round(clock() - started, 1), **free_device_memory(device_type)}


def grow_batch(run_one: Callable[[int], dict], settings: CheckSettings, report: CheckReport, reserve_s: float,
               capacity_gib: float | None) -> dict:
    """Eager sizes from `first_batch`, doubling, until out of memory, images/s stops growing, the next size would
    not fit by its predicted peak memory, `max_batch`, or the time left after `reserve_s`. Saved after each size."""
    sizes = report.part("bench", sizes={})["sizes"]
    best: tuple[int, dict] | None = None
    previous: dict | None = None
    need = settings.needs_s["bench_size"]
    batch, stopped = settings.first_batch, f"reached max_batch {settings.max_batch}"
    while batch <= settings.max_batch:
        if report.deadline.left() - reserve_s < need:
            sizes[f"eager_b{batch}"] = {"status": "skipped", "error": f"needs ~{need:.0f} s, "
                                        f"{report.deadline.left() - reserve_s:.0f} s left before the later parts"}
            stopped = "deadline"
            break
        report.say(f"bench: eager at batch {batch}")
        record = sizes[f"eager_b{batch}"] = measure(run_one, batch, settings.device, report.deadline.clock)
        report.save()
        memory = f"; reserved after {record['reserved_after_gib']} GiB" if "reserved_after_gib" in record else ""
        report.say(f"bench: batch {batch}: " + (f"{record['images_per_s']:.0f} img/s" if record["status"] == "ok"
                                                 else record["error"][:300]) + memory)
        if record["status"] != "ok":
            if record["out_of_memory"]:
                stopped = f"out of memory at batch {batch}"
                break
            batch *= 2  # another error: recorded; the next size may still run
            continue
        need = max(need, 1.5 * record["seconds"])
        if best is not None and record["images_per_s"] < best[1]["images_per_s"] * settings.growth:
            stopped = f"images/s stopped growing at batch {batch}"
            break
        best = (batch, record)
        peak = record.get("peak_memory_gib")
        if capacity_gib and peak:  # activations grow linearly with the batch: peak(2b) = 2 peak(b) - peak(b/2)
            step = peak - previous["peak_memory_gib"] if previous and previous.get("peak_memory_gib") else peak
            if peak + step > 0.95 * capacity_gib:
                stopped = f"batch {2 * batch} would need ~{peak + step:.0f} GiB of {capacity_gib:.0f}"
                break
        previous = record
        batch *= 2
    return report.part("bench", best_batch=best[0] if best else None, stopped=stopped)


def bench_part(out: Path, settings: CheckSettings, workers: int, report: CheckReport, reserve_s: float) -> None:
    import torch

    from hpa_lightning.bench.bench_data import tiled_dataset
    from hpa_lightning.bench.common import PROFILES
    from hpa_lightning.bench.gpu_speed import gpu_run
    from hpa_lightning.bench.overhead import project_recipe
    from hpa_lightning.data.datamodule import HPADataModule

    report.part("bench", status="running")
    started = time.monotonic()
    root = tiled_dataset(out / "bench_cache", settings.bench_n, settings.bench_unique, settings.image_size, 1.0,
                         workers)
    HPADataModule(root=str(root), image_size=settings.image_size, cache_dir=str(out / "bench_cache" / "stores"),
                  pack_workers=workers).prepare_data()  # packed before the first size, which is timed
    recipe = project_recipe(settings.model)
    device = torch.device("cuda", 0) if settings.device == "cuda" else torch.device("cpu")
    base = replace(PROFILES["full"], gpu_model=settings.model, gpu_size=settings.image_size)
    capacity = torch.cuda.get_device_properties(0).total_memory / 2**30 if settings.device == "cuda" else None
    (out / "bench_spec.json").write_text(json.dumps(bench_spec(out, root, settings, workers, recipe, 0)))
    report.part("bench", data_s=round(time.monotonic() - started, 1))

    def run_one(batch: int) -> dict:
        stop_at = time.monotonic() + report.deadline.left() - reserve_s
        return gpu_run(root, out / "bench_cache", replace(base, gpu_batch=batch), workers, recipe, 0, False, device,
                       settings.windows, stop_at=stop_at, augment=False)

    record = grow_batch(run_one, settings, report, reserve_s, capacity)
    ok = record["best_batch"] is not None
    report.part("bench", status="ok" if ok else "failed", seconds=round(time.monotonic() - started, 1),
                **({} if ok else {"error": "no batch size ran"}))


def bench_spec(out: Path, root: Path, settings: CheckSettings, workers: int, recipe: dict, seed: int) -> dict:
    """What bench/gpu_part.py needs to run one more configuration in a process of its own."""
    return {"root": str(root), "cache": str(out / "bench_cache"), "model": settings.model, "size": settings.image_size,
            "workers": workers, "recipe": recipe, "seed": seed, "device": settings.device,
            "windows": asdict(settings.windows)}


def compiled_part(out: Path, settings: CheckSettings, report: CheckReport, env: dict[str, str],
                  timeout_s: float) -> None:
    bench = report.data["parts"].get("bench", {})
    if not bench.get("best_batch") or not (out / "bench_spec.json").is_file():
        report.part("compiled", status="skipped", error="no eager batch size ran")
        return
    result = out / "compiled_result.json"
    result.unlink(missing_ok=True)
    spec = {**json.loads((out / "bench_spec.json").read_text()), "batch": bench["best_batch"], "compiled": True,
            "backend": settings.compile_backend, "stop_in_s": max(1.0, timeout_s - 15.0),  # 15 s to write and exit
            "result": str(result)}
    (out / "compiled_spec.json").write_text(json.dumps(spec))
    record = report.run("compiled", [sys.executable, "-m", "hpa_lightning.bench.gpu_part",
                                     str(out / "compiled_spec.json")], env, timeout_s)
    if result.is_file():
        figures = json.loads(result.read_text())
        eager = bench["sizes"][f"eager_b{bench['best_batch']}"]
        speedup = figures["images_per_s"] / eager["images_per_s"] if eager.get("images_per_s") else None
        report.part("compiled", batch=bench["best_batch"], speedup_over_eager=speedup, **figures)
    elif record["status"] == "ok":
        report.part("compiled", status="failed", error="it exited 0 without writing its figures")


def predict_inputs(out: Path, settings: CheckSettings, workers: int) -> None:
    from hpa_lightning.data.simulator import generate

    if (out / "held_out" / "test").is_dir():
        return
    held_out = generate(out / "held_out_src", n=settings.held_out_n, seed=99, size=settings.image_size,
                        workers=workers)
    (out / "held_out").mkdir(exist_ok=True)
    (held_out / "train").rename(out / "held_out" / "test")


def run_check(out: Path, report_dir: Path, workers: int, settings: CheckSettings, trace_dir: Path | None = None
              ) -> dict:
    """Every part into `out` (data, runs), the report into `report_dir` (gpu_check.json, summary.txt, check.log,
    one log per subprocess part: at most 8 flat files, as the device tool returns them); returns the report."""
    import torch

    gpu = require_cuda() if settings.device == "cuda" else "CPU (rehearsal)"
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run_parts(out, report_dir, workers, settings, trace_dir, gpu)
    finally:
        torch.set_num_threads(threads)


def _run_parts(out: Path, report_dir: Path, workers: int, settings: CheckSettings, trace_dir: Path | None,
               gpu: str) -> dict:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(settings.budget_s)
    data = {"gpu": gpu, "gpus": torch.cuda.device_count() if settings.device == "cuda" else 0,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rehearsal": settings.device != "cuda",
            "budget_s": settings.budget_s, "workers": workers, "out": str(out), "parts": {}}
    report = CheckReport(report_dir, data, summary, deadline)
    env = part_environment(settings)
    commands = plan(out, settings)

    def reserve(after: str) -> float:
        return sum(settings.needs_s[p] for p in ORDER[ORDER.index(after) + 1:])

    def timeout(name: str) -> float | None:
        """What is left after the later parts' least; None (and recorded skipped) when not even this part's least."""
        left = deadline.left()
        if left < settings.needs_s[name]:
            report.part(name, status="skipped", error=f"needs ~{settings.needs_s[name]:.0f} s, {max(0, left):.0f} "
                                                      "s left of the budget")
            report.say(f"{name}: skipped, {max(0, left):.0f} s left")
            return None
        return min(left, max(settings.needs_s[name], left - reserve(name)))

    with report.saved_on_sigterm():
        report.say(f"{gpu}: budget {settings.budget_s:.0f} s, results in {report_dir}")
        try:
            bench_part(out, settings, workers, report, reserve("bench"))
        except Exception as err:  # data preparation or the recipe: recorded, the other parts still run
            report.part("bench", status="failed", error=describe(err))
        for name in ("train", "predict", "sweep"):
            if name == "predict" and report.data["parts"].get("train", {}).get("status") != "ok":
                report.part("predict", status="skipped", error="train did not succeed: no run to predict with")
                continue
            limit = timeout(name)
            if limit is None:
                continue
            if name == "predict":
                try:
                    predict_inputs(out, settings, workers)
                except Exception as err:
                    report.part("predict", status="failed", error=describe(err))
                    continue
            report.run(name, [sys.executable, "-m", *commands[name]], env, limit, cwd=out)
        sweep = report.data["parts"].get("sweep", {})
        if sweep.get("status") in ("ok", "failed", "timeout"):
            results = sorted((out / "sweep").glob("*/results.json"))
            claimed = [json.loads(p.read_text()).get("gpu") for p in results]
            report.part("sweep", jobs_completed=len(results), gpus_claimed=claimed)
            if sweep["status"] == "ok" and len(results) != 2:
                report.part("sweep", status="failed", error=f"{len(results)} of 2 jobs wrote results.json")
        limit = timeout("compiled")
        if limit is not None:
            compiled_part(out, settings, report, env, limit)
        if trace_dir is not None:
            bundle_part(trace_dir, report)
        parts = report.data["parts"]
        report.data["ok"] = all(p.get("status") == "ok" for p in parts.values())
        report.data["state"] = "finished"
        report.data["wall_time_s"] = round(deadline.elapsed(), 1)
        report.save()
    return report.data


def bundle_part(trace_dir: Path, report: CheckReport) -> None:
    from hpa_lightning.bench.device_wheels import resolve

    try:
        resolution = resolve(trace_dir)
    except Exception as err:
        report.part("bundle", status="failed", error=describe(err))
        return
    report.part("bundle", status="ok", resolution=resolution)
    report.say(f"bundle: {', '.join(f'{k}=={v}' for k, v in resolution['needed'].items())}")


def _size_line(key: str, run: dict) -> str:
    if run.get("status") != "ok":
        return f"  bench {key}: {run.get('status')}: {run.get('error', '')[:200]}"
    peak = f", peak {run['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in run else ""
    return (f"  bench {key}: {run['images_per_s']:.0f} img/s, step {run['step_ms']:.1f} ms (windows "
            f"{run['step_ms_min']:.1f}-{run['step_ms_max']:.1f}), host reads/step {run['host_reads_per_step']:.0f}, "
            f"data wait {100 * run['data_wait_share']:.1f} %{peak}")


def summary(report: dict) -> str:
    state = report.get("state")
    verdict = "PASSED" if report.get("ok") else "FAILED" if state == "finished" else state.upper()
    lines = [f"gpu-check on {report['gpu']} ({report['gpus']} GPU(s), torch {report['torch']}, CUDA {report['cuda']}),"
             f" {report['date']}: {verdict} after {report.get('elapsed_s', 0):.0f} of {report['budget_s']:.0f} s"]
    for name, part in report["parts"].items():
        if name == "bench":
            for key, run in (part.get("sizes") or {}).items():
                lines.append(_size_line(key, run))
            lines.append(f"  bench: {part.get('status')}; best batch {part.get('best_batch')}; stopped: "
                         f"{part.get('stopped', part.get('error', '-'))}")
        elif name == "compiled" and part.get("status") == "ok" and "images_per_s" in part:
            speedup = part.get("speedup_over_eager")
            lines.append(_size_line(f"compiled_b{part['batch']}", part) + (f", {speedup:.2f}x eager" if speedup else "")
                         + f", warm-up (compilation) {part['warmup_s']:.0f} s")
        elif name == "bundle" and part.get("status") == "ok":
            lines.append(f"  bundle: {len(part['resolution']['needed'])} distributions beyond the image: "
                         + ", ".join(part["resolution"]["needed"]))
        else:
            outcome = part.get("status", "?")
            if outcome != "ok":
                outcome += f" ({part.get('error', '')})"
            seconds = f" in {part['seconds']:.0f} s" if "seconds" in part else ""
            lines.append(f"  {name}: {outcome}{seconds}")
    return "\n".join(lines)
