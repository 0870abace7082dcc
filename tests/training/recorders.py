"""Callbacks that record what a real training subprocess read (instantiated through Hydra, `+callbacks.rows=...`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class RecordTrainRows(L.Callback):
    """Append `epoch global_step row row ...` per training batch to `<out>/rows_rank<R>.txt` (one file per DDP rank),
    so a test sees exactly which samples each rank trained on, before and after a resume; per validation and test
    batch (sanity checks left out) to `<out>/val_rows_rank<R>.txt` and `<out>/test_rows_rank<R>.txt`."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        rows = " ".join(str(int(r)) for r in batch["index"].tolist())
        with (self.out / f"rows_rank{trainer.global_rank}.txt").open("a") as handle:
            handle.write(f"{trainer.current_epoch} {trainer.global_step} {rows}\n")

    def _record_eval(self, trainer: L.Trainer, stage: str, batch) -> None:
        if trainer.sanity_checking:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        rows = " ".join(str(int(r)) for r in batch["index"].tolist())
        with (self.out / f"{stage}_rows_rank{trainer.global_rank}.txt").open("a") as handle:
            handle.write(f"{trainer.current_epoch} {trainer.global_step} {rows}\n")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        self._record_eval(trainer, "val", batch)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx,
                          dataloader_idx: int = 0) -> None:
        self._record_eval(trainer, "test", batch)


def read_rows(path: Path) -> list[tuple[int, int, list[int]]]:
    """(epoch, global step, rows) per recorded batch."""
    out = []
    for line in path.read_text().splitlines():
        epoch, step, *rows = (int(v) for v in line.split())
        out.append((epoch, step, rows))
    return out
