"""Continuing a run, all in one place: which checkpoint a run continues from (`resume`, `ckpt_path`), the
command that relaunches an interrupted run in its own folder (`python -m hpa_lightning.resume`), and the metrics.csv
that the continued run appends to.

Light at import (no Lightning): the train entry point asks `resume_checkpoint` before it imports the training stack.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import yaml

from hpa_lightning.errors import RunSetupError, UsageError
from hpa_lightning.runs import layout
from hpa_lightning.runs.rerun import config_dir_overrides, read_hydra_config


class RunComplete(Exception):
    """`resume=auto` found a finished run (a requeued job that had already completed): nothing to do, exit 0."""


def resume_checkpoint(run_dir: Path, resume: bool | str, ckpt_path: str | None) -> str | None:
    """The checkpoint `fit` continues from: `ckpt_path`, or with `resume` the run folder's `checkpoints/last.ckpt`.

    `resume=true` with nothing to resume from is an error (never a silent fresh start); `resume=auto` (used by
    requeued cluster jobs) resumes when there is a checkpoint and starts fresh otherwise.
    """
    if ckpt_path:
        if ckpt_path != "last" and not Path(ckpt_path).is_file():
            raise RunSetupError(f"ckpt_path={ckpt_path}: file not found")
        if ckpt_path == "last":
            resume = True
        else:
            return ckpt_path
    if resume in (False, None, "false", "False"):
        return None
    last = layout.checkpoint(run_dir)
    if (run_dir / layout.RESULTS).is_file():
        if resume == "auto":
            raise RunComplete(f"{run_dir}: already complete (results.json exists); nothing to resume")
        raise RunSetupError(f"resume: {run_dir} already finished (results.json exists); start a new run instead")
    if last.is_file():
        return str(last)
    if resume == "auto":
        return None
    raise RunSetupError(f"resume=true: nothing to resume in {run_dir} (no checkpoints/last.ckpt); "
                        f"point hydra.run.dir at the interrupted run's folder")


REPLACED = ("hydra.run.dir=", "resume=", "ckpt_path=")


def resume_command(run_dir: Path, extra: list[str]) -> list[str]:
    """`python -m hpa_lightning.train` with the run's saved overrides, its config dirs, `extra`, its folder and
    `resume=true`."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        raise UsageError(f"{overrides_file}: not found; is {run_dir} a run folder of hpa_lightning.train?")
    overrides = [o for o in yaml.safe_load(overrides_file.read_text()) or [] if not o.startswith(REPLACED)]
    # the config dirs of the user's own options (hydra.searchpath, --config-dir) are in hydra.yaml, not overrides.yaml
    searchpath = [] if any(e.startswith("hydra.searchpath=") for e in extra) else config_dir_overrides(
        read_hydra_config(run_dir))
    return [sys.executable, "-m", "hpa_lightning.train", *overrides, *searchpath, *extra, f"hydra.run.dir={run_dir}",
            "resume=true"]


def continue_csv_logs(loggers: list, resumed_step: int) -> None:
    """A resumed run appends to its metrics.csv (Lightning's CSV writer deletes an existing file when it starts).

    Rows logged after the checkpoint (step >= its global step: a job stopped mid-epoch, or requeued after its last
    epoch-end checkpoint) are logged again by the resumed run, so they are dropped here: no step appears twice.
    """
    from lightning.pytorch.loggers import CSVLogger

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
