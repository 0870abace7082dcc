"""A word about SLURM jobs that pend: while a sweep under `hydra/launcher=slurm` waits for its jobs, `squeue` is
polled and a job that stays PENDING for a reason other than waiting its turn (for example `PartitionConfig`: the
partition can never give what the job asks for) is reported once, with the launcher settings to change, instead of
the controller waiting in silence until someone looks.

The Hydra callback that runs the watcher is `runs.hydra_callbacks.ReportPendingJobs`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


# Reasons that only mean "wait your turn"; anything else is worth a word.
ORDINARY_PENDING_REASONS = {"None", "Priority", "Resources", "BeginTime", "Dependency", "JobArrayTaskLimit",
                            "(null)", "ReqNodeNotAvail, Reserved for maintenance"}


# seconds between two looks at squeue (HPA_SLURM_POLL_S, for tests)
POLL_SECONDS = float(os.environ.get("HPA_SLURM_POLL_S", "60"))


def pending_jobs(submitit_root: Path) -> list[tuple[str, str]]:
    """(job id, reason) of this sweep's jobs that are PENDING, from squeue; its batch scripts live under
    `submitit_root`, which tells its jobs from anyone else's."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "PENDING", "-o", "%i|%r|%o"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    jobs = []
    for line in out.splitlines():
        job_id, _, rest = line.partition("|")
        reason, _, command = rest.rpartition("|")
        if command.startswith(str(submitit_root)):
            jobs.append((job_id.strip(), reason.strip()))
    return jobs


class PendingWatcher:
    """Reports, once per job and reason, this sweep's jobs that pend for an unusual reason."""

    def __init__(self, submitit_root: Path, interval: float = POLL_SECONDS):
        self.submitit_root = submitit_root
        self.interval = interval
        self.reported: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slurm-pending-watcher", daemon=True)

    def check(self) -> list[str]:
        lines = []
        for job_id, reason in pending_jobs(self.submitit_root):
            if reason in ORDINARY_PENDING_REASONS or (job_id, reason) in self.reported:
                continue
            self.reported.add((job_id, reason))
            lines.append(f"SLURM job {job_id} is pending: {reason}. It may never start: check hydra.launcher."
                         f"partition, cpus_per_task, mem_gb, gpus_per_node and timeout_min against the partition "
                         f"(scontrol show partition; scontrol show job {job_id}).")
        for line in lines:
            log.warning(line)
            print(line, file=sys.stderr, flush=True)
        return lines

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def __enter__(self) -> PendingWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
