"""Callbacks of a run: the per-iteration learning-rate trace of every parameter group (the poster's figure 4)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L

from hpa_lightning import layout


def group_lrs(optimizer) -> dict[str, float]:
    """LR per named group; the `_no_decay` twin of a group always shares its LR, so it is left out."""
    lrs = {}
    for i, group in enumerate(optimizer.param_groups):
        name = group.get("name", f"group{i}")
        if not name.endswith("_no_decay"):
            lrs[name] = float(group["lr"])
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

        fig, ax = plt.subplots(figsize=(7, 3.5))
        steps = [r["step"] for r in rows]
        for name in rows[0]:
            if name not in ("step", "epoch"):
                ax.plot(steps, [r[name] for r in rows], label=name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("learning rate")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("Learning rate per parameter group")
        fig.tight_layout()
        fig.savefig(output_dir / "lr_trace.png", dpi=120)
        plt.close(fig)
    return path
