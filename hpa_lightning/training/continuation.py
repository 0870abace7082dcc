"""Continuing a run, all in one place: which checkpoint a run continues from (`resume`, `ckpt_path`), the
command that relaunches an interrupted run in its own folder (`python -m hpa_lightning.resume`), and the metrics.csv
that the continued run appends to.

Light at import (no Lightning): the train entry point asks `resume_checkpoint` before it imports the training stack.
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import yaml

from hpa_lightning.errors import RunSetupError, UsageError, UserError
from hpa_lightning.runs import layout
from hpa_lightning.runs.rerun import config_dir_overrides, read_hydra_config

log = logging.getLogger(__name__)


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
    if (run_dir / layout.RESULTS).is_file():
        if resume == "auto":
            raise RunComplete(f"{run_dir}: already complete (results.json exists); nothing to resume")
        raise RunSetupError(f"resume: {run_dir} already finished (results.json exists); start a new run instead")
    candidates = checkpoint_candidates(run_dir)
    if candidates:
        return str(candidates[0])
    if resume == "auto":
        return None
    raise RunSetupError(f"resume=true: nothing to resume in {run_dir} (no checkpoints/last.ckpt); "
                        f"point hydra.run.dir at the interrupted run's folder")


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """The run's checkpoints in the order a resume tries them: `last.ckpt`, then the others (best.ckpt, ...) newest
    first. The temporaries of a checkpoint being written are not among them (they do not end in .ckpt)."""
    last = layout.checkpoint(run_dir)
    others = [path for path in last.parent.glob("*.ckpt") if path.name != last.name and path.is_file()]
    others.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    return ([last] if last.is_file() else []) + others


def load_resume_checkpoint(run_dir: Path, resume_from: str) -> tuple[str, dict]:
    """The checkpoint a run continues from, loaded (`weights_only=True`): `resume_from`, or, when that is one of the
    run's own checkpoints and cannot be read (truncated by a crash or a full disk, not a training checkpoint), the
    newest readable one of the run. Each checkpoint passed over is one warning line naming it and why; none readable
    is a `RunSetupError` naming them. A `ckpt_path=` of the user's own is loaded as given, without a fallback."""
    from hpa_lightning.checkpoints import safe_torch_load

    path = Path(resume_from)
    candidates = checkpoint_candidates(run_dir)
    if path not in candidates:
        return resume_from, safe_torch_load(path)
    passed_over = []
    for candidate in candidates[candidates.index(path):]:
        try:
            checkpoint = safe_torch_load(candidate)
            if not (isinstance(checkpoint, dict) and "loops" in checkpoint and "state_dict" in checkpoint):
                raise RunSetupError(f"{candidate}: not a training checkpoint (no loop state); it cannot be resumed")
        except UserError as err:
            passed_over.append(str(err))
            log.warning("resume: %s; trying the run's older checkpoints", err)
            continue
        if passed_over:
            log.warning(
                "resume: continuing from %s (epoch %s, step %s), the newest readable checkpoint of the run", candidate,
                checkpoint.get("epoch"), checkpoint.get("global_step"))
        return str(candidate), checkpoint
    raise RunSetupError(f"resume: no readable checkpoint in {path.parent} ({'; '.join(passed_over)})")


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
