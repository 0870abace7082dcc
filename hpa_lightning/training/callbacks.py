"""Every callback of a training run; conf/callbacks/default.yaml names them all, so each can be removed or
replaced from the command line (`~callbacks.lr_trace`).

- `FreezeBackbone`: the poster's first stage, only the head trains for `frozen_epochs`, then everything.
- `LRTrace`: the per-iteration learning rate of every parameter group (the poster's figure 4).
- `RNGState`: the random generators' states in checkpoints, so a resumed run draws what an uninterrupted one would.
- `FiniteCheckpointGuard`: never a checkpoint with NaN or infinite weights.
- `InterruptCheckpoint`: Ctrl-C, SIGTERM or a requeue signal finish the epoch's checkpoints and save last.ckpt.
"""

from __future__ import annotations

import contextlib
import csv
import random
import signal
import threading
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hpa_lightning.cli import EXIT_INTERRUPTED, EXIT_TERMINATED
from hpa_lightning.errors import FrozenStageError, NonFiniteCheckpointError
from hpa_lightning.runs import layout
from hpa_lightning.training.checks import all_finite

INTERRUPTS = (KeyboardInterrupt, SIGTERMException)


# Stops that come from outside and deserve a last.ckpt: the interrupts, and a SystemExit raised inside fit by a signal
# handler, as submitit's SIGUSR2 handler does when it requeues a job shortly before its time limit.
CHECKPOINTED_STOPS = (*INTERRUPTS, SystemExit)


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

    Where the stop lands: during fit this callback's SIGTERM handler stops the run at the end of the training batch
    (at an epoch's last batch: once the epoch is complete), never inside a validation. Lightning 2.6's own handler
    stops a validation at its next batch, and a run stopped inside its epoch-end validation resumes without that
    validation or the epoch's logged metrics. Under DDP a SIGTERM may reach one rank only (one node of a multi-node
    job preempted); Lightning's handler then broadcasts from inside the signal handler, a collective the other ranks
    are not in (gloo aborts: "collective mismatch"). Here each rank notes the signal, the ranks agree on it after
    each batch (one all-reduce) and all stop at the same step, saving the checkpoint together.
    """

    def __init__(self, dirpath: str | Path, run_dir: str | Path):
        self.ckpt_path = str(Path(dirpath) / layout.LAST_CHECKPOINT)
        self.run_dir = Path(run_dir)
        self.saved: str | None = None
        self.interrupt_exit_code: int | None = None
        self._validated_step: int | None = None
        self._sigterm_noted = False
        self._sigterm_held = False
        self._handler_installed = False
        self._replaced_handler: object = None  # what SIGTERM did before fit (Lightning's handler)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._replaced_handler = signal.signal(signal.SIGTERM, lambda signum, frame: self._note_sigterm(trainer))
            self._handler_installed = True

    def _note_sigterm(self, trainer: L.Trainer) -> None:
        self._sigterm_noted = True
        if trainer.world_size == 1 and not trainer.validating:
            # Lightning stops at the end of this batch; ranks of a DDP run stop where they agree to
            trainer._signal_connector.received_sigterm = True  # noqa: SLF001 - what its own handler sets

    def _agree_on_sigterm(self, trainer: L.Trainer) -> None:
        if not self._handler_installed:
            return
        noted = self._sigterm_noted
        if trainer.world_size > 1:
            flag = torch.tensor([int(noted)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            noted = bool(flag)
        if noted:  # Lightning raises its SIGTERMException (on every rank) at its next check
            trainer._signal_connector.received_sigterm = True  # noqa: SLF001 - what its own handler sets

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not trainer.is_last_batch:  # the last batch's validation follows: decided at the epoch's end
            self._agree_on_sigterm(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._agree_on_sigterm(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._handler_installed:
            # None: a handler not installed from Python, which Python cannot put back; the default is the closest
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._replaced_handler is None else self._replaced_handler)
            self._handler_installed = False

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        # a stop agreed before a validation inside an epoch (val_check_interval < 1) waits until it has ended
        if trainer.state.fn == "fit" and trainer.received_sigterm:
            self._sigterm_held = True
            trainer._signal_connector.received_sigterm = False  # noqa: SLF001 - set back in on_validation_end

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_step = trainer.global_step
        if self._sigterm_held:
            self._sigterm_held = False
            trainer._signal_connector.received_sigterm = True  # noqa: SLF001

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
        self._restore_handler()
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


@contextlib.contextmanager
def interrupt_exit_codes(interrupt: InterruptCheckpoint | None):
    """Exit 130 on Ctrl-C and 143 on SIGTERM (Lightning exits 1 on Ctrl-C, and its SIGTERM exception would exit 0)."""
    try:
        yield
    except SIGTERMException:
        raise SystemExit(EXIT_TERMINATED) from None
    except SystemExit:
        if interrupt is not None and interrupt.interrupt_exit_code is not None:
            raise SystemExit(interrupt.interrupt_exit_code) from None
        raise


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


def body_batchnorms(model: nn.Module, head: frozenset[str]) -> list[_BatchNorm]:
    """The BatchNorm layers outside the head (`head`: the names of the head's parameters)."""
    return [layer for name, layer in model.named_modules() if isinstance(layer, _BatchNorm)
            and not any(f"{name}.{p}" in head for p, _ in layer.named_parameters(recurse=False))]


class FreezeBackbone(L.Callback):
    """Everything but the head is frozen for the first `frozen_epochs` epochs. The head is the architecture's whole
    head, everything `forward_head` runs (`HPAModule.head_names`: the classifier, and ConvNeXt's or MaxViT's head
    norm and pre-logits, a ViT's fc_norm); the rest is the body.

    Frozen means: the body's forward pass runs without autograd (`HPAModule.body_frozen`), so its parameters get no
    gradient, and its BatchNorm layers are held in eval mode, so they normalise with their (pretrained) running
    statistics and those statistics do not move. A parameter without a gradient is skipped by the optimizer (no
    momentum, no weight decay) until the body is unfrozen.

    Not Lightning's BaseFinetuning (`requires_grad=False`): DDP registers its gradient hooks for the parameters that
    require grad when it wraps the model, before the first epoch, so parameters unfrozen later were never all-reduced
    and the ranks drifted apart (Lightning issue 20340). Here every parameter requires grad from the start, and DDP
    is told that some take no part in the frozen stage's backward pass (`find_unused_parameters`, set by
    `trainer=ddp` and `trainer=ddp_cpu`).
    """

    def __init__(self, frozen_epochs: int = 1):
        super().__init__()
        self.frozen_epochs = frozen_epochs
        self._batchnorms: list[_BatchNorm] = []

    def _frozen(self, epoch: int) -> bool:
        return epoch < self.frozen_epochs

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batchnorms = body_batchnorms(pl_module.net, pl_module.head_names)  # the network is fixed during fit
        strategy = trainer.strategy
        if (self.frozen_epochs > 0 and trainer.world_size > 1 and isinstance(strategy, DDPStrategy)
                and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)):
            raise FrozenStageError(
                f"finetune.frozen_epochs={self.frozen_epochs} under DDP needs "
                "trainer.strategy=ddp_find_unused_parameters_true (the frozen body takes no part in the backward "
                "pass); or set finetune.frozen_epochs=0")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run resumed mid-epoch continues its epoch without Lightning calling on_train_epoch_start again
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # set from the epoch, not toggled once: a run resumed after the unfreeze epoch comes back unfrozen
        pl_module.body_frozen = self._frozen(trainer.current_epoch)
        if not pl_module.body_frozen:
            # Lightning keeps each submodule's mode across epochs: the BatchNorm layers held in eval mode while
            # frozen resume updating their statistics
            for layer in self._batchnorms:
                layer.train()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # Lightning puts the whole model in train mode at every epoch start; frozen BatchNorm stays in eval mode
        if self._frozen(trainer.current_epoch):
            for layer in self._batchnorms:
                if layer.training:
                    layer.eval()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.body_frozen = False


def group_lrs(optimizer) -> dict[str, float]:
    """LR per named group; the `_no_decay` twin of a group always shares its LR, so both count once, under the
    group's name (a layer of norms and biases alone has only the twin)."""
    lrs = {}
    for i, group in enumerate(optimizer.param_groups):
        lrs[group.get("name", f"group{i}").removesuffix("_no_decay")] = float(group["lr"])
    return lrs


class LRTrace(L.Callback):
    """Logs `lr/<group>` and writes `lr_trace.csv` (+ `lr_trace.png`) with the LR of each group at every step."""

    def __init__(self, output_dir: str, log_every_n_steps: int = 1, plot: bool = True):
        self.output_dir = Path(output_dir)
        self.log_every_n_steps = log_every_n_steps
        self.plot = plot
        self.rows: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        lrs = group_lrs(trainer.optimizers[0])
        self.rows.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **lrs})
        if trainer.global_step % self.log_every_n_steps == 0:
            pl_module.log_dict({f"lr/{name}": lr for name, lr in lrs.items()}, on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict.get("rows", []))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.rows:
            write_lr_trace(self.rows, self.output_dir, plot=self.plot)


def write_lr_trace(rows: list[dict[str, float]], output_dir: Path, plot: bool = True) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / layout.LR_TRACE
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = [name for name in rows[0] if name not in ("step", "epoch")]
        many = len(groups) > 6  # layer-wise decay: one group per layer, coloured from the input to the head
        fig, ax = plt.subplots(figsize=(9 if many else 7, 3.5))
        steps = [r["step"] for r in rows]
        colors = plt.cm.viridis([i / max(1, len(groups) - 1) for i in range(len(groups))]) if many else [None] * len(
            groups)
        for name, color in zip(groups, colors, strict=True):
            ax.plot(steps, [r[name] for r in rows], label=name, color=color)
        ax.set_xlabel("iteration")
        ax.set_ylabel("learning rate")
        ax.set_yscale("log")
        if many:
            ax.legend(fontsize="x-small", ncol=1 + len(groups) // 16, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            ax.legend()
        ax.set_title("Learning rate per parameter group")
        fig.tight_layout()
        fig.savefig(output_dir / "lr_trace.png", dpi=120)
        plt.close(fig)
    return path


class _AveragingGuard:
    """What Lightning's weight averaging does before anything has been averaged, made safe.

    Its averaged model starts as a copy of the initial weights, and Lightning swaps it in for validation, writes it
    into checkpoints and copies it over the model at the end whether or not it was ever updated: with averaging
    that starts at a later epoch, validation and best.ckpt would see the untrained network. Until the first update
    the live weights are used. Outside fit (validate/test of best.ckpt) a checkpoint's state_dict already holds the
    averaged weights, so there is nothing to restore and no warning to give.
    """

    def _has_average(self) -> bool:
        average = self._average_model
        return average is not None and int(average.n_averaged) > 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._has_average():
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._has_average():
            super().on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._has_average():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._average_model is not None and "current_model_state" in checkpoint:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._has_average():
            super().on_train_end(trainer, pl_module)


class EMAWeightAverage(_AveragingGuard, EMAWeightAveraging):
    """Exponential moving average of the weights after every optimizer step (Lightning's EMAWeightAveraging, made
    safe before its first update); validation, checkpoints' state_dict, test, predict and export use the average."""

    method = "ema"  # results.json's weight_averaging.method


class SWAWeightAverage(_AveragingGuard, WeightAveraging):
    """Stochastic weight averaging: the equal-weight mean of the weights at the end of every epoch from
    `start_epoch` on (with SGDR, snapshots along the restarts; pudae averaged 10 checkpoints). Updated after the
    epoch's last optimizer step, so the epoch's own validation and checkpoints already include it. BatchNorm
    statistics are averaged like the weights (`use_buffers`), not recomputed."""

    method = "swa"  # results.json's weight_averaging.method

    def __init__(self, start_epoch: int = 1, device: str | None = None, use_buffers: bool = True) -> None:
        super().__init__(device=device, use_buffers=use_buffers)  # torch's default avg_fn: the running mean
        self.start_epoch = int(start_epoch)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return False  # the updates come from on_train_batch_end, at the last batch of each epoch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.is_last_batch and trainer.current_epoch >= self.start_epoch:
            self._average_model.update_parameters(pl_module)
            self._latest_update_step = trainer.global_step
