"""Finding the jobs of sweeps and single runs under a folder, with their status, error and overrides."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from hpa_lightning.files import pid_alive
from hpa_lightning.runs import layout
from hpa_lightning.runs.status import read_status

SKIP_DIRS = {"wandb", "checkpoints", ".hydra", ".submitit", "lightning_logs"}


@dataclass
class Job:
    dir: Path
    status: str                     # completed | failed | crashed | running | incomplete | lr_find
    error: str | None = None
    overrides: list[str] = field(default_factory=list)
    rerun_of: Path | None = None
    marker: dict = field(default_factory=dict)

    @property
    def origin(self) -> Path:
        """The folder of the first attempt (itself unless this is a rerun)."""
        return self.rerun_of if self.rerun_of is not None else self.dir


def job_status(job_dir: Path) -> tuple[str, dict]:
    job_dir = Path(job_dir)
    marker = read_status(job_dir)
    if (job_dir / layout.RESULTS).is_file():
        return "completed", marker
    if (job_dir / layout.LR_FIND).is_file():
        return "lr_find", marker
    status = marker.get("status")
    if status == "failed" or (job_dir / layout.FAILED).is_file():
        return "failed", marker
    if status == "running":
        pid, host = marker.get("pid"), marker.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
            return "crashed", marker
        return "running", marker
    return "incomplete", marker


def _read_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(v) for v in OmegaConf.load(path)]


def find_jobs(root: str | Path) -> list[Job]:
    """Every job folder under `root`: folders with `.hydra/`, results.json or status.json (not inside a job's
    wandb/ or checkpoints/ folders), in natural order of their paths."""
    root = Path(root)
    found: dict[Path, Job] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        is_job = ".hydra" in dirnames or layout.RESULTS in filenames or layout.STATUS in filenames
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("offline-run-")]
        if not is_job:
            continue
        status, marker = job_status(here)
        error = marker.get("error") if status in ("failed", "crashed") else None
        if status == "failed" and not error and (here / layout.FAILED).is_file():
            error = (here / layout.FAILED).read_text().strip() or None
        if status == "crashed":
            error = f"process {marker.get('pid')} on {marker.get('host')} ended without marking the job"
        rerun_of = marker.get("rerun_of")
        found[here] = Job(dir=here, status=status, error=error, overrides=_read_overrides(here),
                          rerun_of=Path(rerun_of) if rerun_of else None, marker=marker)
    return sorted(found.values(), key=lambda job: natural_key(str(job.dir)))


def natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


RERUNNABLE = ("failed", "crashed", "incomplete")


def failed_jobs(root: str | Path, statuses: tuple[str, ...] = RERUNNABLE) -> list[Job]:
    """The first attempt of every job whose attempts all failed (latest attempt's status in `statuses`)."""
    jobs = find_jobs(root)
    chains: dict[Path, list[Job]] = {}
    for job in jobs:
        chains.setdefault(job.origin.resolve(), []).append(job)
    failed = []
    for origin, attempts in chains.items():
        if any(a.status == "completed" for a in attempts):
            continue
        first = next((a for a in attempts if a.dir.resolve() == origin), attempts[0])
        latest = max(attempts, key=lambda a: a.marker.get("started", ""))
        if first.status == "lr_find" or latest.status not in statuses:
            continue
        failed.append(first)
    return failed
