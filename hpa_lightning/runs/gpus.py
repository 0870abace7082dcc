"""One GPU per job for parallel sweeps: a job claims a free GPU through lock files before CUDA initialises.

    HPA_NUM_GPUS=4 python -m hpa_lightning.train -m +sweep=poster hydra/launcher=gpu_pool

The `gpu_pool` launcher (conf/hydra/launcher/gpu_pool.yaml) runs `HPA_NUM_GPUS` jobs at once; each job, in
`hpa_lightning.train.main`, enters `claim_gpu(n_gpus)`: it takes a non-blocking `fcntl.flock` on
`<lock dir>/gpu<id>.lock` for the first free GPU of the pool (polling while all are taken), sets
`CUDA_VISIBLE_DEVICES` to that one GPU (so the job's `cuda:0` is the claimed GPU) and holds the lock until the job
ends. The kernel drops a flock when its holder dies, so a crashed job never leaves a GPU locked, and the same lock
files keep two sweeps (or a sweep and `rerun_failed`) started on one machine off each other's GPUs.

- The pool is the first `n_gpus` entries of `CUDA_VISIBLE_DEVICES` (0..n_gpus-1 when unset; the variable is
  restored when a claim ends); lock files are named after those physical ids, so overlapping pools exclude each
  other too.
- Lock folder: `HPA_GPU_LOCK_DIR`, else `<tmp>/hpa_lightning_gpu_locks_<uid>`: one per user and machine.
- Joblib (loky) reuses worker processes between jobs, and a process whose CUDA is initialised can no longer switch
  GPUs: its later claims therefore wait for the GPU it already uses (with one worker per GPU that GPU is free).
- `HPA_SIMULATE_GPUS=N` claims among N simulated GPUs without touching CUDA (for tests on CPU); the claim is
  recorded like a real one (`HPA_CLAIMED_GPU`, results.json `gpu`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV_NUM_GPUS = "HPA_NUM_GPUS"
ENV_SIMULATE = "HPA_SIMULATE_GPUS"
ENV_LOCK_DIR = "HPA_GPU_LOCK_DIR"
ENV_CLAIMED = "HPA_CLAIMED_GPU"
CUDA_ENV = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class GpuClaim:
    index: int        # position in the pool, 0..n_gpus-1
    device: str       # the physical id written to CUDA_VISIBLE_DEVICES
    simulated: bool
    n_gpus: int
    lock: str         # the lock file held while the job runs
    waited_s: float   # time spent waiting for a free GPU
    claimed_at: float  # time.time() when the lock was taken

    def as_dict(self) -> dict:
        return asdict(self)


_pinned: GpuClaim | None = None  # the GPU this process's CUDA was initialised on, if any


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError as err:
        raise ValueError(f"{name}={value!r}: expected a whole number of GPUs") from err
    if number < 0:
        raise ValueError(f"{name}={value!r}: expected a whole number of GPUs")
    return number


def simulated_gpus() -> int | None:
    """N from `HPA_SIMULATE_GPUS=N`, else None."""
    return _int_env(ENV_SIMULATE) or None


def default_lock_dir() -> Path:
    configured = os.environ.get(ENV_LOCK_DIR)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"hpa_lightning_gpu_locks_{os.getuid()}"


def pool_devices(n_gpus: int, simulated: bool = False) -> list[str]:
    """Physical ids of the pool: the first `n_gpus` of CUDA_VISIBLE_DEVICES (outside any claim), else 0..n-1."""
    if simulated:
        return [str(i) for i in range(n_gpus)]
    visible = os.environ.get(CUDA_ENV)
    if visible is None or not visible.strip():
        return [str(i) for i in range(n_gpus)]
    ids = [part.strip() for part in visible.split(",") if part.strip()]
    if n_gpus > len(ids):
        raise ValueError(f"{n_gpus} GPUs requested ({ENV_NUM_GPUS} / launcher n_jobs) but {CUDA_ENV}={visible} "
                         f"lists {len(ids)}")
    return ids[:n_gpus]


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _lock_name(device: str) -> str:
    return "gpu" + re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock"


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _write_holder(fd: int, device: str, job: str | None) -> None:
    """Who holds the lock, for people looking at the lock folder (the lock itself is the flock, not this text)."""
    os.ftruncate(fd, 0)
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "gpu": device, "job": job,
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
    os.pwrite(fd, text.encode() + b"\n", 0)


@contextlib.contextmanager
def claim_gpu(n_gpus: int, lock_dir: str | Path | None = None, poll_s: float = 2.0, timeout_s: float | None = None,
              simulate: bool | None = None, job: str | None = None) -> Iterator[GpuClaim]:
    """Hold one free GPU of a pool of `n_gpus` for the duration of the block; yields the `GpuClaim`.

    Waits (polling every `poll_s` seconds, at most `timeout_s`, forever when None) until a GPU is free. Unless
    simulated, `CUDA_VISIBLE_DEVICES` is set to the claimed GPU inside the block and restored after it.
    """
    global _pinned
    if n_gpus < 1:
        raise ValueError(f"claim_gpu needs at least one GPU, got n_gpus={n_gpus}")
    simulated = simulated_gpus() is not None if simulate is None else simulate
    devices = pool_devices(n_gpus, simulated)
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    candidates = list(range(n_gpus))
    if not simulated and _pinned is None and _cuda_initialised():
        raise RuntimeError("CUDA was initialised in this process before its GPU claim, so CUDA_VISIBLE_DEVICES can "
                           "no longer select the claimed GPU; claim before anything touches CUDA")
    if not simulated and _pinned is not None and _cuda_initialised():
        if _pinned.device not in devices:
            raise RuntimeError(f"this process already initialised CUDA on GPU {_pinned.device}, outside the pool "
                               f"{devices}; run the job in a fresh process")
        candidates = [devices.index(_pinned.device)]  # this process can only use the GPU its CUDA started on
    started = time.monotonic()
    announced = False
    while True:
        for index in candidates:
            path = lock_dir / _lock_name(devices[index])
            fd = _try_lock(path)
            if fd is not None:
                break
        else:
            waited = time.monotonic() - started
            if timeout_s is not None and waited >= timeout_s:
                raise TimeoutError(f"no free GPU among {[devices[i] for i in candidates]} after {waited:.0f} s "
                                   f"(locks in {lock_dir})")
            if not announced:
                log.info("all %d GPUs of the pool are busy; waiting for one (locks in %s)", len(candidates), lock_dir)
                announced = True
            time.sleep(poll_s)
            continue
        break

    claim = GpuClaim(index=index, device=devices[index], simulated=simulated, n_gpus=n_gpus, lock=str(path),
                     waited_s=round(time.monotonic() - started, 3), claimed_at=time.time())
    saved = {name: os.environ.get(name) for name in (CUDA_ENV, ENV_CLAIMED)}
    try:
        _write_holder(fd, claim.device, job)
        os.environ[ENV_CLAIMED] = str(index)
        if not simulated:
            os.environ[CUDA_ENV] = claim.device
            if not _cuda_initialised():
                _pinned = claim
        log.info("claimed GPU %s (pool index %d of %d%s)", claim.device, index, n_gpus,
                 ", simulated" if simulated else "")
        yield claim
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def job_pool_size(launcher_choice: str | None, launcher_n_jobs: int | None) -> int:
    """How many GPUs a job of this run shares, i.e. whether it must claim one (0: no claim, Lightning picks).

    `HPA_SIMULATE_GPUS=N` -> N; the `gpu_pool` launcher -> its n_jobs; submitit launchers -> 0 (the scheduler
    assigns GPUs); otherwise `HPA_NUM_GPUS` when set (concurrent single runs then share the machine's GPUs too).
    """
    simulated = simulated_gpus()
    if simulated:
        return simulated
    if launcher_choice is not None and ("submitit" in launcher_choice or launcher_choice == "slurm"):
        return 0
    if launcher_choice == "gpu_pool":
        return int(launcher_n_jobs or 1)
    return _int_env(ENV_NUM_GPUS) or 0


@contextlib.contextmanager
def claim_for_job(job: str | None = None, devices: object = 1) -> Iterator[GpuClaim | None]:
    """The GPU claim of the current Hydra job (None when it needs none); see `job_pool_size`.

    A claim is one GPU: a job that claims must train on one device (`trainer.devices=1`).
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    choice = hydra_cfg.runtime.choices.get("hydra/launcher")
    n_gpus = job_pool_size(choice, hydra_cfg.launcher.get("n_jobs"))
    if n_gpus <= 0:
        yield None
        return
    if str(devices) != "1":
        raise ValueError(f"trainer.devices={devices}: a job of the GPU pool (hydra/launcher=gpu_pool, {ENV_NUM_GPUS} "
                         f"or {ENV_SIMULATE}) claims exactly one GPU; use trainer.devices=1 or another launcher")
    with claim_gpu(n_gpus, job=job) as claim:
        yield claim
