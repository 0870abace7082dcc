"""Fault injectors, instantiated into real training subprocesses through Hydra (`+callbacks.fault=...`)."""

from __future__ import annotations

import os
import signal
import sys

import lightning as L


class InterruptAfterEpoch(L.Callback):
    """Raise Ctrl-C (KeyboardInterrupt) at the end of training epoch `epoch`, as a user would."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


class SigtermAtStep(L.Callback):
    """Send SIGTERM to this process after optimizer step `step` (mid-epoch), as a scheduler preempting a job."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class PoisonWeightsAtStep(L.Callback):
    """Make the weights non-finite after step `step`, as a divergent update would."""

    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            next(pl_module.net.parameters()).data.fill_(float("nan"))


class SubmititTimeoutAtStep(L.Callback):
    """submitit's way of ending a job near its time limit: SLURM sends SIGUSR2, submitit's handler requeues the job and
    calls sys.exit(-1) from inside whatever the main thread was doing. Installed like submitit's, sent at `step`."""

    def __init__(self, step: int = 3):
        self.step = step
        signal.signal(signal.SIGUSR2, lambda signum, frame: sys.exit(-1))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR2)


class RealWarning(L.Callback):
    """A warning nobody has silenced, as a library would raise it: it must stay visible and reach the run log."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import warnings

        warnings.warn("an unexpected condition worth a look", UserWarning, stacklevel=1)
