"""Weights & Biases for training jobs: one W&B run per job, grouped by sweep, with result panels at the end.

    python -m hpa_lightning.train +experiment=focal_g02 logger=wandb                 # W&B only
    python -m hpa_lightning.train -m +sweep=poster logger=wandb_csv                  # W&B and metrics.csv
    python -m hpa_lightning.train logger=wandb logger.wandb.mode=offline             # no network: `wandb sync` later

- One run per job: Lightning's WandbLogger never finishes its run, so `hpa_lightning.train.main` (through
  `runs.status.JobGuard` and `reporting.wandb_hooks.WandbHooks`) calls `finish_run` at the end of every job,
  `exit_code=1` when the job failed (a job that failed before training started gets a run of its own, only to be
  marked failed). A run still open when a job
  starts (left over by an earlier job of the same process) is finished first.
- Offline: `mode: offline` (or `WANDB_MODE=offline`) writes `<job dir>/wandb/offline-run-*/run-*.wandb`, which
  `wandb sync <that folder>` uploads later. Lightning's own `offline: true` flag would set WANDB_MODE for the whole
  process (all later jobs of a sweep worker); here it is translated into this run's `mode` instead.
- Group: `group` when set, else the sweep folder's name in a multirun (one group per launch; reruns made by
  `hpa_lightning.rerun_failed` inside the sweep folder join it); tags: the experiment name (from the config).
- Sweep jobs (runs/swept.py): job type = the job's arm (its swept `key=value`s but seed and fold), tags += its swept
  `key=value`s, and `choices` in the config holds its config groups' choices (`choices.loss`), so that
  `python -m hpa_lightning.dashboard SWEEP_DIR` can group the curves by arm and plot the swept keys.
- Config: the whole resolved job config as a nested dict (`optimizer.lr` is a W&B key; Lightning adds the module's
  hyperparameters).
- Metrics: whatever Lightning logs (per-epoch train/val/test metrics, `lr/<group>` per step from `LRTrace`).
- At the end of a successful job (`log_results`): the summary (val/test macro F1 at 0.5 and tuned, ROC AUC, device,
  GPU), `results/per_class` (a table: class id and name, val/test F1 at 0.5 and tuned, test ROC AUC, positives,
  threshold), `test/pr_curves` and `test/roc_curves` (one chart each, a curve per class with test positives and
  negatives, from test_predictions.csv), and `test/samples`: the first `panels.samples` test images as RGB
  composites with their true and predicted (tuned thresholds) labels.

RGB composite of the four channels (uint8): R = red + yellow/2, G = green + yellow/2, B = blue, clipped to 255, so
the yellow (ER) channel shows yellow while the green protein channel keeps its own colour.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hpa_lightning.runs import swept

log = logging.getLogger(__name__)


def is_wandb_node(node: Any) -> bool:
    target = node.get("_target_", "") if isinstance(node, (dict, DictConfig)) else ""
    return str(target).rsplit(".", 1)[-1] == "WandbLogger"


def wandb_node(cfg: DictConfig) -> DictConfig | None:
    for node in (cfg.get("logger") or {}).values():
        if node is not None and is_wandb_node(node):
            return node
    return None


def _hydra_multirun():
    """Hydra's config of this job when it is a multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
            return hydra_cfg
    return None


def _sweep_dir(run_dir: Path) -> Path | None:
    """The sweep folder this job belongs to: its multirun's, or the one a rerun was placed in; None for a single run."""
    hydra_cfg = _hydra_multirun()
    if hydra_cfg is not None:
        return Path(hydra_cfg.sweep.dir)
    if (run_dir.parent / swept.MULTIRUN_FILE).is_file():  # a rerun placed in its sweep folder
        return run_dir.parent
    return None


def _job_suffix() -> str:
    hydra_cfg = _hydra_multirun()
    return f"-{hydra_cfg.job.num}" if hydra_cfg is not None else ""


def sweep_identity(run_dir: Path) -> dict | None:
    """A sweep job's W&B identity: its arm (job type), swept `key=value` tags and its config groups' choices."""
    from hydra.core.hydra_config import HydraConfig

    sweep_dir = _sweep_dir(run_dir)
    if sweep_dir is None:
        return None
    overrides, choices = [], {}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        overrides = list(hydra_cfg.overrides.task)
        choices = {str(k): str(v) for k, v in hydra_cfg.runtime.choices.items()
                   if v is not None and not str(k).startswith("hydra")}
    values = swept.job_values(overrides, swept.sweep_keys_of(swept.read_multirun(sweep_dir)))
    return {"group": sweep_dir.name, "job_type": swept.arm_of(values), "tags": swept.tags_of(values),
            "choices": choices}


def logger_kwargs(node: DictConfig, cfg: DictConfig) -> tuple[dict, dict]:
    """(WandbLogger keyword arguments, panel options) for a `logger.wandb` node of `cfg`."""
    kwargs = OmegaConf.to_container(node, resolve=True)
    kwargs.pop("_target_", None)
    panels = {**PANEL_DEFAULTS, **(kwargs.pop("panels", None) or {})}
    if kwargs.pop("offline", False):
        kwargs["mode"] = "offline"
    if kwargs.get("mode") is None:
        kwargs.pop("mode", None)  # WANDB_MODE, else online
    run_dir = Path(cfg.paths.output_dir)
    kwargs["save_dir"] = str(kwargs.get("save_dir") or run_dir)
    Path(kwargs["save_dir"]).mkdir(parents=True, exist_ok=True)
    if not kwargs.get("name"):
        kwargs["name"] = f"{cfg.experiment_name}{_job_suffix()}"
    kwargs["tags"] = [str(t) for t in (kwargs.get("tags") or [])]
    kwargs["config"] = OmegaConf.to_container(cfg, resolve=True)  # nested: `optimizer.lr` is a W&B config key
    sweep = sweep_identity(run_dir)
    if sweep is not None:  # the dashboard (reporting/wandb_dashboard.py) groups and plots by these
        kwargs["group"] = kwargs.get("group") or sweep["group"]
        kwargs["job_type"] = sweep["job_type"]
        kwargs["tags"] = list(dict.fromkeys(kwargs["tags"] + sweep["tags"]))
        kwargs["config"][CHOICES_KEY] = sweep["choices"]
    return kwargs, panels


def build_logger(node: DictConfig, cfg: DictConfig):
    """A logger of `cfg.logger`: W&B nodes get their per-job run settings, others are instantiated as they are."""
    if not is_wandb_node(node):
        from hydra.utils import instantiate

        return instantiate(node)
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    if wandb.run is not None:
        log.warning("finishing W&B run %s left open by an earlier job of this process", wandb.run.id)
        wandb.finish()
    kwargs, _ = logger_kwargs(node, cfg)
    return WandbLogger(**kwargs)


def _init_kwargs(node: DictConfig, cfg: DictConfig) -> dict:
    """wandb.init arguments equivalent to the WandbLogger of `node` (for runs made outside Lightning)."""
    kwargs, _ = logger_kwargs(node, cfg)
    kwargs["dir"] = kwargs.pop("save_dir")
    for lightning_only in ("log_model", "prefix", "checkpoint_name", "experiment", "add_file_policy", "version"):
        kwargs.pop(lightning_only, None)
    return kwargs


def finish_run(cfg: DictConfig, failed: bool, error: str | None = None) -> None:
    """Finish this job's W&B run (exit code 1 when `failed`); a failed job without a run gets one to show it."""
    node = wandb_node(cfg)
    wandb = sys.modules.get("wandb")
    if node is None and (wandb is None or wandb.run is None):
        return
    try:
        if wandb is None or wandb.run is None:
            if not failed or node is None:
                return
            import wandb

            wandb.init(**_init_kwargs(node, cfg))
        if failed and error:
            wandb.run.summary["error"] = error
        wandb.finish(exit_code=1 if failed else 0)
    except Exception as err:  # the job's own outcome is already recorded; W&B trouble must not change it
        log.warning("could not finish the W&B run: %s", err)


def offline_runs(folder: str | Path) -> list[Path]:
    """The offline run folders (`offline-run-*`) under `folder`."""
    return sorted(p.parent for p in Path(folder).rglob("offline-run-*/run-*.wandb"))


def _records(path: Path) -> list[bytes]:
    """The records of a `.wandb` transaction log (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    data = path.read_bytes()
    block, pos, records, pending = 32768, 7, [], b""
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    return records


def read_offline_run(run_folder: str | Path, wait_s: float = 0.0) -> dict:
    """What an offline run recorded: name, group, tags, config, history rows, summary, exit code, media files.

    W&B's service writes the transaction log in the background and may append the run's last records (summary, exit)
    a moment after `wandb.finish()` returns, later still on a loaded machine: with `wait_s`, the log is read again
    until its exit record is there or `wait_s` seconds have passed.
    """
    import time

    deadline = time.monotonic() + wait_s
    while True:
        found = _read_offline_run_once(Path(run_folder))
        if found["exit_code"] is not None or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def _read_offline_run_once(run_folder: Path) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb

    log_file = next(run_folder.glob("run-*.wandb"))
    out: dict[str, Any] = {"name": None, "group": None, "job_type": None, "tags": [], "config": {}, "history": [],
                           "summary": {},
                           "exit_code": None}

    def key_of(item) -> str:
        return item.key or "/".join(item.nested_key)

    for data in _records(log_file):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(name=record.run.display_name, group=record.run.run_group, tags=list(record.run.tags),
                       job_type=record.run.job_type,
                       project=record.run.project, id=record.run.run_id)
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({key_of(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({key_of(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({key_of(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    out["media"] = sorted(str(p.relative_to(run_folder / "files")) for p in (run_folder / "files").rglob("*")
                          if p.is_file() and "media" in p.parts)
    return out


# The config key under which a sweep job logs its config groups' choices (`choices.loss` = "bce"): a swept group
# (`loss=bce,focal`, `+experiment=...`) is a dashboard axis through it.
CHOICES_KEY = "choices"
PANEL_DEFAULTS = {"samples": 8, "curves": True, "per_class": True, "curve_points": 41, "class_maps": True}
