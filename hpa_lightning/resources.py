"""What this process may use of its machine (light imports: the generator's worker interpreters import it)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (cgroup cpusets, `taskset`, SLURM's binding), capped by
    `SLURM_CPUS_PER_TASK` inside a SLURM job (without task binding the mask can be the whole node). Not
    `os.cpu_count()`, which is the node's."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(1, cpus)
