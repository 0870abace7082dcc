"""A run stopped mid-epoch (SIGTERM, a requeue) and resumed goes on exactly where it was: what Lightning 2.6 saves but
does not hand back, and what it does not save.

- The training loader's position (`ThreadedDataLoader.state_dict`: the epoch's random state and the batches
  delivered). Lightning saves it with the fit loop, but restores it only into a loader set up after the checkpoint is
  read; the module's `configure_optimizers` asks `estimated_stepping_batches`, which sets the loader up before that
  (the loader's state is then silently dropped: Lightning issues 20550, litdata 775). Handed back at train start,
  through Lightning's own loading code, before the loader draws its first batch.
- The epoch's accumulated logged values (`train/loss`'s epoch mean, the progress bar's `loss`): Lightning keeps them
  in the training loop's result collection, which no checkpoint holds, so the resumed epoch's mean would cover only
  the batches after the resume. Saved with a checkpoint written mid-epoch and added back, in the order an
  uninterrupted run adds them, at the resumed run's first logging of each.

The random generators' states are `RNGState`'s (training/callbacks.py); the non-finite loss not yet reported is the
module's own checkpoint entry.
"""

from __future__ import annotations

import lightning as L
import torch

# the checkpoint key of the accumulated values: {result key: {"value": tensor, "cumulated_batch_size": tensor}}
LOGGED_KEY = "hpa_epoch_logged_values"


def _training_results(trainer: L.Trainer):
    return trainer.fit_loop.epoch_loop._results  # noqa: SLF001 - the collection `self.log` accumulates into in training


class MidEpochState(L.Callback):
    """Completes a mid-epoch checkpoint and its resume (module docstring)."""

    def __init__(self) -> None:
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "fit" or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # an epoch's end: its values are logged and reset before the next epoch starts
        saved = {}
        for key, result in _training_results(trainer).items():
            if getattr(result, "is_tensor", False) and result.meta.on_epoch:
                entry = {"value": result.value.detach().cpu().clone()}
                if result.meta.is_mean_reduction:
                    entry["cumulated_batch_size"] = result.cumulated_batch_size.detach().cpu().clone()
                saved[key] = entry
        if saved:
            checkpoint[LOGGED_KEY] = saved

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._pending = dict(checkpoint.get(LOGGED_KEY) or {})

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if fit_loop._combined_loader_states_to_load:  # noqa: SLF001 - Lightning's own restore, run when it can act
            fit_loop._load_combined_loader_states()  # noqa: SLF001
        if not (fit_loop.restarted_mid_epoch and fit_loop.epoch_loop.batch_progress.current.completed > 0):
            self._pending = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not self._pending:
            return
        results = _training_results(trainer)
        for key in [key for key in self._pending if key in results]:
            saved, result = self._pending.pop(key), results[key]
            # the resumed epoch's first value was added to the default (0, or +-inf for max/min): combined with the
            # saved total by the same reduction, the total is bit for bit the uninterrupted run's
            value = saved["value"].to(result.value)
            if result.meta.is_mean_reduction or result.meta.is_sum_reduction:
                result.value = value + result.value
            elif result.meta.is_max_reduction:
                result.value = torch.maximum(value, result.value)
            elif result.meta.is_min_reduction:
                result.value = torch.minimum(value, result.value)
            if "cumulated_batch_size" in saved and result.meta.is_mean_reduction:
                result.cumulated_batch_size = saved["cumulated_batch_size"].to(result.cumulated_batch_size) + \
                    result.cumulated_batch_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = {}
        # litdata's StreamingDataLoader replays its loaded state at every `iter` until one of its epochs runs to
        # StopIteration; Lightning stops asking at the epoch's known length, so after a resumed epoch the next one
        # would replay the finished position and yield nothing. The resumed epoch is over: let the next start afresh.
        combined = trainer.fit_loop._combined_loader  # noqa: SLF001
        for loader in combined.flattened if combined is not None else []:
            if getattr(loader, "restore", False) is True:
                loader.restore = False
