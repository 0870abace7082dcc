"""LR range test (the poster's figure 3) with Lightning's Tuner: `python -m hpa_lightning.lr_find [overrides]`.

Sweeps the learning rate exponentially over `num_training` steps of the whole network and suggests the LR where the
loss falls fastest (still clearly decreasing, well before the minimum). Lightning's finder drives every parameter
group with the same LR; set `optimizer.lr` (the head's LR) to the suggestion and the body groups follow their ratios.
Writes lr_find.csv (lr, loss), lr_find.png (log x axis, suggestion marked) and lr_find.json into the run folder.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from hpa_lightning.cli import hydra_task, run_hydra
from hpa_lightning.errors import UserError
from hpa_lightning.logs import adopt_lightning_loggers


@hydra.main(version_base="1.3", config_path="../conf", config_name="lr_find")
@hydra_task
def main(cfg: DictConfig) -> float | None:
    from hpa_lightning.training.lr_range import lr_find  # after Hydra has checked the overrides: it imports Lightning

    adopt_lightning_loggers()
    try:
        return lr_find(cfg)["suggested_lr"]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_hydra(main)
