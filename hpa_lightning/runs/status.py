"""The bookkeeping of every training job: status.json, the FAILED marker, the GPU claim and the hooks that tell
the outside world (W&B) how the job went.

Every job of `hpa_lightning.train` (single run or sweep job) keeps `status.json` in its folder: `running` while it
runs (with pid, host and its Hydra/SLURM identity), then `completed` or `failed` (with the error line and
traceback); a failed job also gets a `FAILED` file holding the error line. `results.json` is written only by a
successful run (runs/outputs.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hpa_lightning.runs import layout

ENV_RERUN_OF = "HPA_RERUN_OF"


def error_line(err: BaseException) -> str:
    if isinstance(err, SystemExit):
        return f"SystemExit: exit status {err.code}"
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    return line[:1000]


def read_status(job_dir: Path) -> dict:
    path = Path(job_dir) / layout.STATUS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_status(job_dir: Path, status: str, fresh: bool = False, **fields) -> dict:
    """Update status.json (a `fresh` one starts empty: a new attempt in this folder) and the FAILED marker."""
    from hpa_lightning.files import write_json_atomic

    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    payload = {**({} if fresh else read_status(job_dir)), "status": status, **fields}
    if status == "running":
        payload.pop("finished", None)
        (job_dir / layout.FAILED).unlink(missing_ok=True)
    else:
        payload["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(job_dir / layout.STATUS, payload)
    if status == "failed":
        (job_dir / layout.FAILED).write_text(payload.get("error", "failed") + "\n")
    return payload


def _hydra_job_info() -> dict:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return slurm_ids()
    hydra_cfg = HydraConfig.get()
    info = {"mode": str(hydra_cfg.mode.name) if hydra_cfg.mode is not None else None,
            "overrides": list(hydra_cfg.overrides.task), "job_name": hydra_cfg.job.name}
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        info["job_num"] = int(hydra_cfg.job.num)
        info["sweep_dir"] = str(Path(hydra_cfg.sweep.dir).resolve())
    return {**info, **slurm_ids()}


# SLURM's names for a job: its id, and for an array task (a sweep job under hydra/launcher=slurm) the array's id and
# the task's index; a requeued job keeps them, and `sacct -j` / `scontrol show job` take them.
SLURM_ID_VARIABLES = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
                      "slurm_array_task_id": "SLURM_ARRAY_TASK_ID", "slurm_restart_count": "SLURM_RESTART_COUNT"}


def slurm_ids() -> dict[str, str]:
    return {key: os.environ[name] for key, name in SLURM_ID_VARIABLES.items() if os.environ.get(name)}


def process_rank() -> int:
    """The global rank of this process as the launchers set it (0 outside distributed training)."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


class JobHooks:
    """What a job tells services outside its run folder. These defaults tell nothing; the entry point passes the W&B
    ones (`hpa_lightning.reporting.wandb_hooks.WandbHooks`), so the job lifecycle never imports W&B itself."""

    def build_logger(self, node: Any, cfg: Any) -> Any:
        """A Lightning logger for one node of `cfg.logger`."""
        from hydra.utils import instantiate

        return instantiate(node)

    def log_results(self, cfg: Any, results: dict, run_dir: Path) -> None:
        """After a successful job: its results."""

    def finish_run(self, cfg: Any, failed: bool, error: str | None = None) -> None:
        """At the end of every job, failed or not."""


class JobGuard:
    """The bookkeeping around one training job: status markers, GPU claim, the hooks' run (W&B).

        with JobGuard(cfg, hooks) as job:
            results = job.finish(train(cfg, hooks))

    Inside the block the job holds its GPU (if the launcher or `HPA_NUM_GPUS` asks for claims). On leaving, the
    job is marked `completed`, or `failed` when an exception (SystemExit included) leaves the block: then its W&B
    run (created on the spot if training never started one) is finished with exit code 1 and the exception goes on
    (Hydra's multirun marks the job failed and runs the others).
    """

    def __init__(self, cfg, run_dir: str | Path | None = None, hooks: JobHooks | None = None):
        self.cfg = cfg
        self.hooks = hooks or JobHooks()
        self.run_dir = Path(run_dir if run_dir is not None else cfg.paths.output_dir)
        self.claim = None
        self.error: BaseException | None = None
        self._stack = contextlib.ExitStack()
        # DDP ranks 1..N-1 (Lightning re-launches this entry point for them) leave the bookkeeping to rank 0.
        self.active = process_rank() == 0

    def __enter__(self) -> JobGuard:
        from hpa_lightning.runs import gpus

        if not self.active:
            return self
        info = _hydra_job_info()
        write_status(self.run_dir, "running", fresh=True, pid=os.getpid(), host=socket.gethostname(),
                     started=time.strftime("%Y-%m-%dT%H:%M:%S"), rerun_of=os.environ.get(ENV_RERUN_OF), **info)
        try:
            self.claim = self._stack.enter_context(gpus.claim_for_job(job=str(self.run_dir),
                                                                      devices=self.cfg.trainer.get("devices", 1)))
        except BaseException as err:
            self._stack.close()
            self._close(err, sys.exc_info()[2])
            raise
        if self.claim is not None:
            write_status(self.run_dir, "running", gpu=self.claim.as_dict())
        return self

    def fail(self, err: BaseException) -> None:
        """Record `err` as the job's error (before a `sys.exit` that would otherwise be recorded instead)."""
        self.error = err

    def finish(self, results: dict | None) -> dict | None:
        """After a successful `train`: the claimed GPU into results.json, the results to the hooks (W&B panels)."""
        if not self.active:
            return results
        if results and self.claim is not None and (self.run_dir / layout.RESULTS).is_file():
            from hpa_lightning.files import write_json_atomic

            results = {**results, "gpu": self.claim.as_dict()}
            write_json_atomic(self.run_dir / layout.RESULTS, results)
        if results:
            self.hooks.log_results(self.cfg, results, self.run_dir)
        return results

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.active:
            released_at = time.time()  # just before the GPU lock goes
            self._stack.close()
            extra = {"gpu": {**self.claim.as_dict(), "released_at": released_at}} if self.claim is not None else {}
            self._close(exc, tb, **extra)
        return False

    def _close(self, exc: BaseException | None, tb, **extra) -> None:
        if exc is None:
            write_status(self.run_dir, "completed", **extra)
            self.hooks.finish_run(self.cfg, failed=False)
            return
        error = self.error or exc
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__ or tb))
        write_status(self.run_dir, "failed", error=error_line(error), traceback=trace[-6000:], **extra)
        self.hooks.finish_run(self.cfg, failed=True, error=error_line(error))
