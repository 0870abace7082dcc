"""Fault injectors, instantiated into real training subprocesses through Hydra (`+callbacks.fault=...`)."""

from __future__ import annotations

import os
import signal
import sys

import lightning as L

from hpa_lightning.training.checkpoint_io import AtomicCheckpointIO


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


class SignalAt(L.Callback):
    """Send signal `sig` (TERM or KILL) to this process at one point of a run, as a cluster preempting it (TERM, with a
    grace period) or a node dying (KILL) would:

    - `train`: after training batch `step` (global step);
    - `validation`: after the first validation batch of epoch `epoch` (during fit);
    - `before_checkpoints`: when epoch `epoch`'s validation has ended, before the checkpoint callbacks see it;
    - `test`: after the first batch of the test evaluation;
    - `outputs`: while the run folder is written, after the predictions and before results.json.

    Under DDP only rank `rank` is signalled, as when a node of a multi-node job is preempted.
    """

    def __init__(self, at: str = "train", sig: str = "TERM", step: int = 3, epoch: int = 0, rank: int = 0):
        if at not in ("train", "validation", "before_checkpoints", "test", "outputs"):
            raise ValueError(f"SignalAt: unknown point {at!r}")
        self.at, self.signum, self.step, self.epoch = at, signal.Signals[f"SIG{sig}"], step, epoch
        self.rank = rank  # under DDP, the one rank that gets the signal
        self.sent = False

    def _send(self) -> None:
        if not self.sent and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == self.rank:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.at == "train" and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.at == "validation" and trainer.state.fn == "fit" and not trainer.sanity_checking \
                and trainer.current_epoch == self.epoch:
            self._send()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.at == "before_checkpoints" and trainer.state.fn == "fit" and trainer.current_epoch == self.epoch:
            self._send()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.at == "test":
            self._send()

    def on_test_end(self, trainer, pl_module) -> None:
        if self.at != "outputs":
            return
        from hpa_lightning.training import job

        write_evaluation = job.write_evaluation

        def write_then_signal(*args, **kwargs):
            written = write_evaluation(*args, **kwargs)  # the predictions and thresholds are on disk now
            self._send()
            return written

        job.write_evaluation = write_then_signal


class SignalDuringCheckpointWrite(AtomicCheckpointIO):
    """The project's checkpoint writer, sending signal `sig` to this process halfway through writing checkpoint
    number `nth` (1 = the first one the run writes), as a preemption or a dying node would."""

    def __init__(self, sig: str = "KILL", nth: int = 2):
        super().__init__()
        self.signum, self.nth, self.count = signal.Signals[f"SIG{sig}"], nth, 0

    def write(self, handle, data) -> None:
        self.count += 1
        if self.count != self.nth:
            return super().write(handle, data)
        half = len(data) // 2
        handle.write(data[:half])
        handle.flush()
        os.kill(os.getpid(), self.signum)
        handle.write(data[half:])
