"""Train, validate and test one configuration; write the run folder. `python -m hpa_lightning.train +experiment=...`.

Returns `val/macro_f1` of the best checkpoint, the metric Hydra sweepers optimise.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict, read_write

from hpa_lightning import layout
from hpa_lightning.classes import CLASS_NAMES
from hpa_lightning.cli import ENV_SAVED_OVERRIDES, EXIT_TERMINATED, hydra_task, run_hydra
from hpa_lightning.datamodule import HPADataModule
from hpa_lightning.finetune import FrozenStageError, resolve_recipe
from hpa_lightning.inference import safe_torch_load
from hpa_lightning.losses import positive_class_weights
from hpa_lightning.model import PretrainedUnavailable
from hpa_lightning.module import HPAModule, NonFiniteLossError
from hpa_lightning.reliability import (
    AttemptLog,
    InterruptCheckpoint,
    NonFiniteCheckpointError,
    RunComplete,
    RunSetupError,
    check_output_dir,
    checkpoint_bytes,
    resume_checkpoint,
)
from hpa_lightning.run_outputs import plain, write_evaluation, write_results
from hpa_lightning.sources import DataError
from hpa_lightning.targets import UnsafeTargetError, check_targets

log = logging.getLogger(__name__)
# Errors a user fixes by changing data, config or LR: reported as one line (in multirun the job is marked failed).
USER_ERRORS = (DataError, PretrainedUnavailable, RunSetupError, NonFiniteLossError, NonFiniteCheckpointError,
               UnsafeTargetError, FrozenStageError)


def prepare_datamodule(cfg: DictConfig) -> HPADataModule:
    """Generate/pack/split up front, so bad data fails in seconds with one line, before any model is built."""
    datamodule: HPADataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def loss_config(cfg: DictConfig, datamodule: HPADataModule) -> dict:
    """The loss node with `pos_weight: auto` replaced by numbers from the train split (saved with the checkpoint)."""
    loss = plain(cfg.loss)
    if loss.get("pos_weight") == "auto":
        loss["pos_weight"] = positive_class_weights(datamodule.train_labels()).round(4).tolist()
    return loss


def build_module(cfg: DictConfig, datamodule: HPADataModule) -> HPAModule:
    mean, std = datamodule.stats
    return HPAModule(model=plain(cfg.model), loss=loss_config(cfg, datamodule), optimizer=plain(cfg.optimizer),
                     scheduler=plain(cfg.scheduler), lr_ratios=list(cfg.finetune.lr_ratios),
                     augment=plain(cfg.augment), mean=mean, std=std, class_names=list(CLASS_NAMES))


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The `callbacks` config group, every one of them (conf/callbacks/default.yaml): nothing is added in code."""
    return [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]


def build_loggers(cfg: DictConfig) -> list:
    from hpa_lightning.wandb_logging import build_logger  # W&B: one run per job, named/grouped/configured per job

    return [build_logger(node, cfg) for node in (cfg.get("logger") or {}).values() if node is not None]


def device_description(trainer: L.Trainer) -> str:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def check_saved_config(cfg: DictConfig) -> None:
    """A job relaunched by `resume` or `rerun_failed` has its configuration read back from a run folder that anyone
    may have written: it may name only the allowlisted `_target_`s. A command line typed by the user is their own
    and is not restricted."""
    saved = os.environ.get(ENV_SAVED_OVERRIDES)
    if saved:
        check_targets(cfg, saved)


def resolve_finetune(cfg: DictConfig) -> list[str]:
    """Replace `auto` in cfg.finetune (see hpa_lightning.finetune.resolve_recipe) before anything reads it; returns
    the keys that were auto, for results.json."""
    pretrained = cfg.model.get("pretrained") not in (False, None, "", "false", "False")
    frozen, ratios, auto = resolve_recipe(cfg.finetune.frozen_epochs, cfg.finetune.lr_ratios, pretrained)
    with open_dict(cfg):
        cfg.finetune.frozen_epochs, cfg.finetune.lr_ratios = frozen, ratios
    if auto:
        source = "pretrained weights" if pretrained else "no pretrained weights"
        log.info("finetune (auto, %s): frozen_epochs=%d, lr_ratios=%s", source, frozen, [round(r, 4) for r in ratios])
    return auto


def train(cfg: DictConfig) -> dict:
    started = time.time()
    run_dir = Path(cfg.paths.output_dir)
    check_saved_config(cfg)
    finetune_auto = resolve_finetune(cfg)
    resume_from = resume_checkpoint(run_dir, cfg.get("resume", False), cfg.get("ckpt_path"))
    L.seed_everything(cfg.seed, workers=True)

    datamodule = prepare_datamodule(cfg)
    module = build_module(cfg, datamodule)
    timings = {"prepare_s": time.time() - started}
    check_output_dir(run_dir, need_bytes=2 * checkpoint_bytes(module) + 50 * 2**20)
    callbacks = build_callbacks(cfg)
    interrupt = next((c for c in callbacks if isinstance(c, InterruptCheckpoint)), None)
    loggers = build_loggers(cfg)
    if resume_from:
        continue_csv_logs(loggers, int(safe_torch_load(Path(resume_from))["global_step"]))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    environ_before = dict(os.environ)
    if trainer.world_size > 1:
        keep_ddp_children_in_this_job()
    fit_started = time.time()
    attempts = AttemptLog(run_dir, started, resumed_from=resume_from, active=trainer.is_global_zero)
    with attempts.recording(timings), interrupt_exit_codes(interrupt):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        checkpoint = trainer.checkpoint_callback
        best = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint else None
        timings["fit_s"] = time.time() - fit_started
        trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
        trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
        timings["evaluate_s"] = time.time() - fit_started - timings["fit_s"]

    results: dict = {}
    if trainer.is_global_zero:
        results = write_run_outputs(cfg, run_dir, datamodule, module, trainer, best, time.time() - started, timings,
                                    attempts.finished, finetune_auto)
    end_ddp_job(environ_before)
    return results


@contextlib.contextmanager
def interrupt_exit_codes(interrupt: InterruptCheckpoint | None):
    """Exit 130 on Ctrl-C and 143 on SIGTERM (Lightning exits 1 on Ctrl-C, and its SIGTERM exception would exit 0)."""
    try:
        yield
    except SIGTERMException:
        raise SystemExit(EXIT_TERMINATED) from None
    except SystemExit:
        if interrupt is not None and interrupt.interrupt_exit_code is not None:
            raise SystemExit(interrupt.interrupt_exit_code) from None
        raise


def end_ddp_job(environ_before: dict[str, str]) -> None:
    """Leave the process as a next multirun job expects it: no process group, none of the launcher's variables.

    Lightning's DDP launcher sets LOCAL_RANK, WORLD_SIZE, MASTER_PORT, ... in this process; left behind, the next
    job would take its ranks as created externally and wait forever for children it never starts.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in set(os.environ) - set(environ_before):
        del os.environ[key]


def keep_ddp_children_in_this_job() -> None:
    """Make Lightning's DDP re-launch of this script join this job instead of starting another sweep.

    Lightning starts ranks 1..N-1 as `python -m hpa_lightning.train <sys.argv> hydra.run.dir=<run.dir>`. Inside a
    Hydra multirun that would re-run the whole sweep (`-m` is in sys.argv) into a fresh run.dir. Here the children
    get this job's own overrides and its output folder, in plain run mode.
    """
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def continue_csv_logs(loggers: list, resumed_step: int) -> None:
    """A resumed run appends to its metrics.csv (Lightning's CSV writer deletes an existing file when it starts).

    Rows logged after the checkpoint (step >= its global step: a job stopped mid-epoch, or requeued after its last
    epoch-end checkpoint) are logged again by the resumed run, so they are dropped here: no step appears twice.
    """
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            existing = Path(logger.log_dir) / layout.METRICS
            if existing.is_file():
                saved = existing.read_text()
                rows = list(csv.reader(saved.splitlines()))
                header = rows[0] if rows else []
                step = header.index("step") if "step" in header else None
                kept = [row for row in rows[1:] if step is None or not row[step] or int(row[step]) < resumed_step]
                writer = logger.experiment  # this removes the file
                with existing.open("w", newline="") as handle:
                    csv.writer(handle, lineterminator="\n").writerows([header, *kept] if header else [])
                writer.metrics_keys = header


def write_run_outputs(cfg: DictConfig, run_dir: Path, datamodule: HPADataModule, module: HPAModule, trainer: L.Trainer,
                      best: str | None, wall_time: float, timings: dict[str, float] | None = None,
                      attempts: list[dict] | None = None, finetune_auto: list[str] | None = None) -> dict:
    val, test = module.epoch_results["val"], module.epoch_results["test"]
    evaluation = write_evaluation(cfg, run_dir, val, test, datamodule.ids(test["rows"]), datamodule.split.path)
    min_pos = int(cfg.get("report_min_positives", 20))
    epochs_done = trainer.current_epoch
    results = {
        "status": "completed",
        "experiment": cfg.experiment_name,
        "model": cfg.model.name,
        "loss": cfg.loss.get("name", str(cfg.loss._target_).rsplit(".", 1)[-1]),
        "gamma": float(cfg.loss.get("gamma", 0.0)),
        "scheduler": cfg.scheduler.get("name") if cfg.scheduler else "none",
        "base_lr": float(cfg.optimizer.lr),
        "lr_ratios": list(cfg.finetune.lr_ratios),
        "frozen_epochs": int(cfg.finetune.frozen_epochs),
        "finetune_auto": list(finetune_auto or []),  # which of the two were chosen by `auto`
        "image_size": datamodule.image_size,
        "imbalance": {"pos_weight": module.hparams.loss.get("pos_weight"), "oversample": datamodule.oversample,
                      "oversample_threshold": datamodule.oversample_threshold if datamodule.oversample else None,
                      "train_samples_per_epoch": len(datamodule.train_dataloader().sampler)},
        "pretrained_loaded": bool(module.pretrained_loaded),
        "device": device_description(trainer),
        "precision": str(trainer.precision),
        "seed": int(cfg.seed),
        "epochs": int(epochs_done),
        "best_checkpoint": str(best) if best else None,
        "wall_time_s": round(wall_time, 2),
        # prepare = data generation/packing + model creation; fit = training with per-epoch validation;
        # evaluate = validation and test of the best checkpoint
        "timings_s": {name: round(seconds, 2) for name, seconds in (timings or {}).items()},
        # every attempt of a resumed or requeued run (this one last) and their sum; timings_s is this attempt's
        "attempts": attempts or [],
        "total_wall_time_s": round(sum(a["wall_s"] for a in attempts), 2) if attempts else round(wall_time, 2),
        "data": {"root": str(datamodule.root), "store": str(datamodule.store.path), **datamodule.sources_summary(),
                 "split": {n: len(datamodule.datasets[n]) for n in ("train", "val", "test")},
                 "mean": datamodule.stats[0], "std": datamodule.stats[1]},
        **evaluation,
    }
    time_line = (f"prepare {timings['prepare_s']:.0f}s  fit {timings['fit_s']:.0f}s  evaluate "
                 f"{timings['evaluate_s']:.0f}s  total {wall_time:.0f}s" if timings else "")
    return write_results(run_dir, results, min_pos, time_line)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@hydra_task
def main(cfg: DictConfig) -> float | None:
    # JobGuard: status.json (+ FAILED on failure) in the run folder, a GPU claim under the gpu_pool launcher, the
    # claimed GPU in results.json, result panels and the end of this job's W&B run (failed runs marked failed).
    from hpa_lightning.rerun_failed import JobGuard

    try:  # before JobGuard: a finished run keeps its status
        resume_checkpoint(Path(cfg.paths.output_dir), cfg.get("resume", False), cfg.get("ckpt_path"))
    except RunComplete as done:
        print(done)
        results = json.loads((Path(cfg.paths.output_dir) / layout.RESULTS).read_text())
        return results.get("val", {}).get("macro_f1")
    except RunSetupError:
        pass  # reported inside the job as usual
    with JobGuard(cfg) as job:
        try:
            results = train(cfg)
        except USER_ERRORS as err:
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise  # let Hydra mark this job failed and go on with the others
            job.fail(err)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        results = job.finish(results)
    return results.get("val", {}).get("macro_f1") if results else None


if __name__ == "__main__":
    run_hydra(main)
