"""Checks before training: which checkpoint a run resumes from, room for its checkpoints, finite weights."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from hpa_lightning.errors import RunSetupError
from hpa_lightning.runs import layout

if TYPE_CHECKING:  # the train entry point runs these checks before it imports the training stack
    import torch


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


def check_output_dir(run_dir: Path, need_bytes: int) -> None:
    """Fail now, not after the first epoch, when the run folder is not writable or the disk is nearly full."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        raise RunSetupError(f"{run_dir}: output folder is not writable ({err.strerror or err})") from None
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise RunSetupError(f"{run_dir}: only {free / 2**20:.0f} MiB free on its disk, the run needs about "
                            f"{need_bytes / 2**20:.0f} MiB for checkpoints and outputs")


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """Rough size of one checkpoint: weights plus optimizer state (momentum) plus buffers."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) * 2 + 2**20


def all_finite(module: torch.nn.Module) -> bool:
    import torch

    # one read for the whole module, not one per parameter (each is a device synchronisation on a GPU)
    flags = [torch.isfinite(p).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True
