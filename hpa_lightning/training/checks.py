"""Checks before training: room for the run's checkpoints, finite weights."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from hpa_lightning.errors import RunSetupError

if TYPE_CHECKING:  # the train entry point runs these checks before it imports the training stack
    import torch


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
