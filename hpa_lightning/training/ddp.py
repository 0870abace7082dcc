"""Lightning's DDP inside Hydra jobs: children that join this job, and a clean process for the next job of a sweep."""

from __future__ import annotations

import os
import sys

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write


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
