"""Keeping long runs safe: resume, checkpoint on interruption, never a non-finite checkpoint, RNG continuity,
and output-folder checks before hours of training."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import uuid
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from hpa_lightning import layout
from hpa_lightning.cli import EXIT_INTERRUPTED, EXIT_TERMINATED
from hpa_lightning.files import write_json_atomic

INTERRUPTS = (KeyboardInterrupt, SIGTERMException)
# Stops that come from outside and deserve a last.ckpt: the interrupts, and a SystemExit raised inside fit by a signal
# handler, as submitit's SIGUSR2 handler does when it requeues a job shortly before its time limit.
CHECKPOINTED_STOPS = (*INTERRUPTS, SystemExit)


class RunSetupError(RuntimeError):
    """A problem with the run itself (resume target, output folder), reported as one line before training."""


class NonFiniteCheckpointError(RuntimeError):
    pass


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
    return all(torch.isfinite(p).all() for p in module.parameters())


class FiniteCheckpointGuard(L.Callback):
    """Refuses to write a checkpoint of non-finite weights, so none can become best or last."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if not all_finite(pl_module):
            raise NonFiniteCheckpointError(f"non-finite weights at epoch {trainer.current_epoch}, step "
                                           f"{trainer.global_step}: checkpoint not written; lower optimizer.lr")


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C, SIGTERM or a signal handler's exit (submitit's requeue on SIGUSR2; not on errors), save
    `last.ckpt` so `resume=true` continues from here.

    Not Lightning's OnExceptionCheckpoint: that one makes every later `fit()` silently resume from its file and
    deletes the file at teardown, where this project wants resuming to be asked for and `last.ckpt` to stay.

    `interrupt` keeps the exception's exit status (130 Ctrl-C, 143 SIGTERM): Lightning turns Ctrl-C into exit 1.
    """

    def __init__(self, dirpath: str | Path, run_dir: str | Path):
        self.ckpt_path = str(Path(dirpath) / layout.LAST_CHECKPOINT)
        self.run_dir = Path(run_dir)
        self.saved: str | None = None
        self.interrupt_exit_code: int | None = None
        self._validated_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_step = trainer.global_step

    def _finish_epoch_checkpoints(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning runs the checkpoint callbacks after every other epoch-end hook. An interrupt in between would
        leave an epoch that was validated out of `best.ckpt` for ever (the resumed run starts at the next epoch), so
        the resumed run would report another best epoch than an uninterrupted one: give them their turn now."""
        if self._validated_step != trainer.global_step:
            return
        for callback in trainer.checkpoint_callbacks:
            # each saves in exactly one of the two hooks, and at most once per step
            callback.on_train_epoch_end(trainer, pl_module)
            callback.on_validation_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, INTERRUPTS):
            self.interrupt_exit_code = exit_code_for(exception)
        if not isinstance(exception, CHECKPOINTED_STOPS) or trainer.state.fn != "fit" or not all_finite(pl_module):
            return
        self._finish_epoch_checkpoints(trainer, pl_module)
        trainer.save_checkpoint(self.ckpt_path)
        self.saved = self.ckpt_path
        if trainer.is_global_zero:
            print(f"\ninterrupted at epoch {trainer.current_epoch}, step {trainer.global_step}; checkpoint saved to "
                  f"{self.ckpt_path}\nresume with: python -m hpa_lightning.resume {self.run_dir}", flush=True)


class AttemptLog:
    """`attempts.json` in the run folder: one entry per attempt at the run (first start, resumes, requeues), with its
    host, SLURM ids, start, wall time, fit/evaluate times and how it ended, so that a requeued run's results.json can
    report every attempt and their total, not only the last one. A fresh (not resumed) run starts a new list."""

    FILE = layout.ATTEMPTS

    def __init__(self, run_dir: Path, started: float, resumed_from: str | None, active: bool = True):
        import socket

        from hpa_lightning.rerun_failed import slurm_ids

        self.path = Path(run_dir) / self.FILE
        self.active = active
        self.previous = self._read() if resumed_from else []
        self.current = {"attempt": len(self.previous) + 1, "host": socket.gethostname(), **slurm_ids(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                        "resumed_from": resumed_from}
        self.started = started
        self.finished: list[dict] = []

    def _read(self) -> list[dict]:
        try:
            attempts = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return attempts if isinstance(attempts, list) else []

    @contextlib.contextmanager
    def recording(self, timings: dict[str, float]):
        """Write this attempt's entry when the block ends, however it ends (completed, interrupted, failed)."""
        outcome = "completed"
        try:
            yield self
        except BaseException as err:
            outcome = f"stopped: {type(err).__name__}"
            raise
        finally:
            entry = {**self.current, "outcome": outcome, "wall_s": round(time.time() - self.started, 2),
                     **{name: round(seconds, 2) for name, seconds in timings.items()}}
            self.finished = [*self.previous, entry]
            if self.active:
                write_json_atomic(self.path, self.finished)


class RNGState(L.Callback):
    """Saves the Python, NumPy and torch RNG states with each checkpoint and restores them on resume.

    Lightning checkpoints do not hold the global RNG state; without it a resumed run draws different augmentations
    and a different shuffle than an uninterrupted one.
    """

    def state_dict(self) -> dict:
        # Tensors and plain Python values only, so the checkpoint still loads with weights_only=True.
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"python": random.getstate(), "torch": torch.get_rng_state(),
                "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)},
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state_dict: dict) -> None:
        random.setstate(_as_python_state(state_dict["python"]))
        numpy_state = state_dict["numpy"]
        np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["gauss"]))
        torch.set_rng_state(state_dict["torch"])
        if state_dict.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _as_python_state(state) -> tuple:
    # a checkpoint round trip may turn the inner tuple into a list
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def exit_code_for(exception: BaseException) -> int:
    if isinstance(exception, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_TERMINATED if isinstance(exception, SIGTERMException) else 1

