"""One training job: data, module, callbacks, loggers, Trainer; fit, validate and test the best checkpoint;
write the run folder."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, open_dict

from hpa_lightning.cli import ENV_SAVED_OVERRIDES
from hpa_lightning.data.cell_store import CellDataModule
from hpa_lightning.data.datamodule import HPADataModule, datamodule_from_config
from hpa_lightning.errors import ConfigError
from hpa_lightning.models.augment import build_augmentation, check_crop
from hpa_lightning.models.losses import positive_class_weights
from hpa_lightning.models.module import HPAModule
from hpa_lightning.models.net import (
    check_image_size,
    check_pretrained_channels,
    is_pretrained,
    offers_dynamic_image_size,
    takes_image_size,
)
from hpa_lightning.runs.attempts import AttemptLog
from hpa_lightning.runs.cell_evaluation import write_test_cells
from hpa_lightning.runs.outputs import check_thresholds, plain, target_name, write_evaluation, write_results
from hpa_lightning.runs.status import JobHooks
from hpa_lightning.targets import check_targets, own_factory, trusted_targets
from hpa_lightning.training.callbacks import (
    EMAWeightAverage,
    InterruptCheckpoint,
    SWAWeightAverage,
    interrupt_exit_codes,
)
from hpa_lightning.training.checks import check_output_dir, checkpoint_bytes
from hpa_lightning.training.continuation import continue_csv_logs, load_resume_checkpoint, resume_checkpoint
from hpa_lightning.training.ddp import end_ddp_job, keep_ddp_children_in_this_job
from hpa_lightning.training.finetune import resolve_layer_decay, resolve_recipe
from hpa_lightning.training.speed import resolve_speed_defaults

log = logging.getLogger(__name__)


def prepare_datamodule(cfg: DictConfig) -> HPADataModule:
    """Generate/pack/split up front, so bad data fails in seconds with one line, before any model is built."""
    datamodule = datamodule_from_config(cfg.data)
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
    resolve_speed_defaults(cfg)  # channels_last: auto (the trainer's precision too, before it is built)
    mean, std = datamodule.stats
    return HPAModule(model=plain(cfg.model), loss=loss_config(cfg, datamodule), optimizer=plain(cfg.optimizer),
                     scheduler=plain(cfg.scheduler), scheduler_interval=str(cfg.get("scheduler_interval", "step")),
                     lr_ratios=list(cfg.finetune.lr_ratios), layer_decay=cfg.finetune.get("layer_decay"),
                     augment=plain(cfg.augment), mean=mean, std=std,
                     class_names=datamodule.class_names, crop=plain(cfg.get("crop")),
                     channels_last=bool(cfg.get("channels_last", False)), compile=bool(cfg.get("compile", False)))


def check_same_classes(checkpoint: dict, path: str, datamodule: HPADataModule) -> None:
    """Resuming (or starting from `ckpt_path`) with another class set than the checkpoint's is one line naming both."""
    saved = list((checkpoint.get("hyper_parameters") or {}).get("class_names") or [])
    if saved and saved != datamodule.class_names:
        raise ConfigError(f"{path}: trained on {len(saved)} classes ({saved[0]}, ...), but data.classes="
                          f"{datamodule.class_set.name} has {len(datamodule.class_names)} "
                          f"({datamodule.class_names[0]}, ...); resume with the checkpoint's class set")


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The `callbacks` config group, every one of them (conf/callbacks/default.yaml): nothing is added in code."""
    return [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]


def build_loggers(cfg: DictConfig, hooks: JobHooks) -> list:
    """The `logger` config group, each built by the hooks (W&B: one run per job, named/grouped/configured per job)."""
    return [hooks.build_logger(node, cfg) for node in (cfg.get("logger") or {}).values() if node is not None]


def device_description(trainer: L.Trainer) -> str:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def check_saved_config(cfg: DictConfig) -> None:
    """A job relaunched by `resume` or `rerun_failed` has its configuration read back from a run folder that anyone
    may have written: it may name only the allowlisted `_target_`s and those the user trusts (`trust=` of those
    commands, HPA_TRUST_TARGETS). A command line typed by the user is their own and is not restricted."""
    saved = os.environ.get(ENV_SAVED_OVERRIDES)
    if saved:
        check_targets(cfg, saved, trust=trusted_targets())


def timm_node(cfg: DictConfig) -> bool:
    """Whether the model node is the project's timm factory (not the user's own `_target_`)."""
    return own_factory(plain(cfg.model)) is None and isinstance(cfg.model.get("name"), str)


def resolve_model(cfg: DictConfig) -> None:
    """Replace `auto` in the model node (`img_size`: the size the network trains on, crop.size or data.image_size;
    `dynamic_img_size`: true when a fixed-size architecture is evaluated on full images after training on crops and
    timm offers it), then check the node before any data is prepared: the weights' channel names, and the
    architecture run at those sizes on the meta device (one line naming the nearest size that works)."""
    crop_size, crop_eval = check_crop(plain(cfg.get("crop")), int(cfg.data.image_size))
    train_size = crop_size or int(cfg.data.image_size)
    size_key = "crop.size" if crop_size else "data.image_size"
    eval_size = int(cfg.data.image_size) if crop_size and crop_eval == "full" else None
    node, ours = cfg.model, timm_node(cfg)
    fixed = ours and takes_image_size(node.name)
    with open_dict(cfg):
        if node.get("img_size") == "auto":  # CNNs take any size: nothing to record
            node.img_size = train_size if fixed or not ours else None
        if node.get("dynamic_img_size") == "auto":
            node.dynamic_img_size = bool(eval_size and fixed and offers_dynamic_image_size(node.name))
    if not ours:
        return
    check_pretrained_channels(plain(node.get("pretrained_channels")))
    if fixed and node.get("img_size") not in (None, train_size):
        raise ConfigError(f"model.img_size={node.img_size}: {node.name} trains on {size_key}={train_size} px; leave "
                          f"model.img_size=auto")
    check_image_size(node.name, train_size, size_key, node.get("global_pool"), bool(node.get("dynamic_img_size")),
                     eval_size)


def resolve_finetune(cfg: DictConfig) -> list[str]:
    """Replace `auto` in cfg.finetune (see hpa_lightning.training.finetune) before anything reads it; returns the
    keys that were auto, for results.json."""
    pretrained = is_pretrained(cfg.model.get("pretrained"))
    frozen, ratios, auto = resolve_recipe(cfg.finetune.frozen_epochs, cfg.finetune.lr_ratios, pretrained)
    transformer = timm_node(cfg) and takes_image_size(cfg.model.name)
    layer_decay, decay_auto = resolve_layer_decay(cfg.finetune.get("layer_decay"), pretrained, transformer)
    with open_dict(cfg):
        cfg.finetune.frozen_epochs, cfg.finetune.lr_ratios = frozen, ratios
        cfg.finetune.layer_decay = layer_decay
    auto = [*auto, *(["layer_decay"] if decay_auto else [])]
    if auto:
        source = "pretrained weights" if pretrained else "no pretrained weights"
        groups = f"layer_decay={layer_decay}" if layer_decay else f"lr_ratios={[round(r, 4) for r in ratios]}"
        log.info("finetune (auto, %s): frozen_epochs=%d, %s", source, frozen, groups)
    return auto


def _is_sgd(target: object) -> bool:
    """Whether an optimizer `_target_` is SGD or a subclass of it (ASGD is not, whatever its name says)."""
    try:
        optimizer = get_object(str(target))
    except Exception:  # noqa: BLE001 - the optimizer is built (and its error reported) later; this is a log line
        return False
    return isinstance(optimizer, type) and issubclass(optimizer, torch.optim.SGD)


def log_recipe(cfg: DictConfig) -> None:
    """One line saying which recipe runs (+preset=scratch or the poster's), and a warning when the poster's
    fine-tuning recipe meets a network without pretrained weights."""
    pretrained = is_pretrained(cfg.model.get("pretrained"))
    groups = (f"layer-wise LR decay {cfg.finetune.layer_decay}" if cfg.finetune.get("layer_decay")
              else f"LR ratios {[round(r, 4) for r in cfg.finetune.lr_ratios]}")
    log.info("recipe: %s (%s; %s lr=%g, schedule %s, frozen_epochs=%d, %s)", cfg.get("recipe", "poster"),
             "pretrained weights" if pretrained else "no pretrained weights",
             str(cfg.optimizer.get("_target_", "?")).rsplit(".", 1)[-1],
             float(cfg.optimizer.lr), target_name(plain(cfg.scheduler)) or "none", int(cfg.finetune.frozen_epochs),
             groups)
    if not pretrained and cfg.get("recipe", "poster") == "poster" and _is_sgd(cfg.optimizer.get("_target_")):
        log.warning("training from scratch with the poster's fine-tuning recipe (SGD lr=%g): it learns slowly "
                    "without pretrained weights; +preset=scratch is the recipe for it", float(cfg.optimizer.lr))


def train(cfg: DictConfig, hooks: JobHooks | None = None) -> dict:
    started = time.time()
    run_dir = Path(cfg.paths.output_dir)
    check_saved_config(cfg)
    check_thresholds(cfg)  # one line now rather than after hours of training
    try:
        check_crop(plain(cfg.get("crop")), int(cfg.data.image_size))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    build_augmentation(plain(cfg.get("augment")))  # a step that cannot take 4 channels: refused before data prep
    resolve_model(cfg)  # an architecture that cannot run at the size: refused before data prep
    finetune_auto = resolve_finetune(cfg)
    speed_auto = resolve_speed_defaults(cfg)
    log_recipe(cfg)
    resume_from = resume_checkpoint(run_dir, cfg.get("resume", False), cfg.get("ckpt_path"))
    L.seed_everything(cfg.seed, workers=True)

    datamodule = prepare_datamodule(cfg)
    module = build_module(cfg, datamodule)
    timings = {"prepare_s": time.time() - started}
    check_output_dir(run_dir, need_bytes=2 * checkpoint_bytes(module) + 50 * 2**20)
    callbacks = build_callbacks(cfg)
    interrupt = next((c for c in callbacks if isinstance(c, InterruptCheckpoint)), None)
    loggers = build_loggers(cfg, hooks or JobHooks())
    if resume_from:
        resume_from, checkpoint = load_resume_checkpoint(run_dir, resume_from)
        check_same_classes(checkpoint, resume_from, datamodule)
        continue_csv_logs(loggers, int(checkpoint["global_step"]))
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
                                    attempts.finished, finetune_auto, speed_auto, callbacks)
    end_ddp_job(environ_before)
    return results


def weight_averaging(cfg: DictConfig, callbacks: list[L.Callback]) -> dict | None:
    """The weight-averaging callback (callbacks=ema|swa, or the user's subclass of them) as {"method": "ema"|"swa",
    its settings}: found by its type among the built callbacks, its settings read from its config node."""
    nodes = [node for node in (cfg.get("callbacks") or {}).values() if node is not None]  # build_callbacks' order
    for node, callback in zip(nodes, callbacks, strict=False):
        if isinstance(callback, EMAWeightAverage | SWAWeightAverage):
            return {"method": callback.method, **{k: v for k, v in plain(node).items() if k != "_target_"}}
    return None


def test_cell_results(run_dir: Path, datamodule: HPADataModule, test: dict, evaluation: dict,
                      trainer: L.Trainer) -> dict | None:
    """A cell model's test cells (runs/cell_evaluation): test_cells.csv, and with data.cell_truth the cell mAP, put into
    the test summary (`cell_map`, `cell_ap_per_class`) and logged as `test/cell_map` to every logger."""
    if not isinstance(datamodule, CellDataModule):
        return None
    cells = write_test_cells(run_dir, datamodule, test)
    if "cell_map" in cells:
        evaluation["test"]["cell_map"] = cells.pop("cell_map")
        evaluation["test"]["cell_ap_per_class"] = cells.pop("cell_ap_per_class")
        value = evaluation["test"]["cell_map"]
        for logger in trainer.loggers:
            logger.log_metrics({"test/cell_map": float("nan") if value is None else float(value)},
                               step=trainer.global_step)
            logger.save()
    return cells


def write_run_outputs(cfg: DictConfig, run_dir: Path, datamodule: HPADataModule, module: HPAModule, trainer: L.Trainer,
                      best: str | None, wall_time: float, timings: dict[str, float] | None = None,
                      attempts: list[dict] | None = None, finetune_auto: list[str] | None = None,
                      speed_auto: dict | None = None, callbacks: list[L.Callback] | None = None) -> dict:
    val, test = module.epoch_results["val"], module.epoch_results["test"]
    ids = {"val": datamodule.ids(val["rows"]), "test": datamodule.ids(test["rows"])}
    evaluation = write_evaluation(cfg, run_dir, val, test, ids, datamodule.split.path, datamodule.train_labels(),
                                  datamodule.class_names)
    cells = test_cell_results(run_dir, datamodule, test, evaluation, trainer)
    min_pos = int(cfg.get("report_min_positives", 20))
    epochs_done = trainer.current_epoch
    results = {
        "status": "completed",
        "experiment": cfg.experiment_name,
        "model": cfg.model.get("name") or target_name(plain(cfg.model)),
        "loss": target_name(plain(cfg.loss)),
        "gamma": float(cfg.loss.get("gamma", 0.0)),
        "scheduler": target_name(plain(cfg.scheduler)) or "none",
        "weight_averaging": weight_averaging(cfg, callbacks or []),  # None, or the EMA/SWA method and settings
        "base_lr": float(cfg.optimizer.lr),
        "recipe": str(cfg.get("recipe", "poster")),
        "lr_ratios": list(cfg.finetune.lr_ratios),
        "layer_decay": cfg.finetune.get("layer_decay"),  # null: the lr_ratios depth groups
        "frozen_epochs": int(cfg.finetune.frozen_epochs),
        "finetune_auto": list(finetune_auto or []),  # which of them were chosen by `auto`
        "image_size": datamodule.image_size,
        "model_img_size": cfg.model.get("img_size"),  # the size a fixed-size architecture was built for
        "imbalance": {"pos_weight": module.hparams.loss.get("pos_weight"), "oversample": datamodule.oversample,
                      "oversample_threshold": datamodule.oversample_threshold if datamodule.oversample else None,
                      "train_samples_per_epoch": datamodule.train_samples_per_epoch()},
        "pretrained_loaded": bool(module.pretrained_loaded),
        "device": device_description(trainer),
        "precision": str(trainer.precision),
        "benchmark": bool(cfg.trainer.get("benchmark") or False),  # cudnn.benchmark, as the Trainer set it
        "channels_last": bool(module.channels_last),
        "speed_auto": sorted(speed_auto or {}),  # which of precision / benchmark / channels_last `auto` chose
        # the run's processes: a multi-node run is more than `device` says
        "world_size": int(trainer.world_size), "num_nodes": int(trainer.num_nodes),
        "devices_per_node": int(trainer.num_devices),
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
        "data": {"root": str(datamodule.root), "store": datamodule.stream_url or str(datamodule.store.path),
                 **datamodule.sources_summary(), "split": datamodule.split_counts(),
                 "mean": datamodule.stats[0], "std": datamodule.stats[1]},
        **evaluation,
        **({"cells": cells} if cells is not None else {}),  # a cell model (data=hpa2021_cells): its test cells
    }
    time_line = (f"prepare {timings['prepare_s']:.0f}s  fit {timings['fit_s']:.0f}s  evaluate "
                 f"{timings['evaluate_s']:.0f}s  total {wall_time:.0f}s" if timings else "")
    return write_results(run_dir, results, min_pos, time_line)
