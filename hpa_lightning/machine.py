"""What this process may use of its machine, and what a cluster job should ask for (light imports: the synthetic
generator's worker interpreters import it)."""

from __future__ import annotations

import math
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


def job_cpus(num_workers: int) -> int:
    """CPUs per task: the training process plus one per reader (thread or worker process)."""
    return int(num_workers) + 1


def job_mem_gb(image_size: int, batch_size: int, num_workers: int) -> int:
    """Memory per task: about 6 GB for Python, torch, CUDA's host side and the model, plus the batches in flight
    (each reader holds one uint8 batch, the trainer one more and its float copy). The packed store is read through a
    memory map: its pages are file cache, which the kernel reclaims, so it is not counted."""
    batch_bytes = int(batch_size) * 4 * int(image_size) ** 2
    in_flight = (int(num_workers) + 2) * batch_bytes * (1 + 4)  # uint8 batch and its float32 copy
    return math.ceil(6 + in_flight / 2**30)


def register_resolvers() -> None:
    """`${hpa.job_cpus:...}` and `${hpa.job_mem_gb:...}` for the SLURM launcher config."""
    from omegaconf import OmegaConf

    for name, function in (("hpa.job_cpus", job_cpus), ("hpa.job_mem_gb", job_mem_gb)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
