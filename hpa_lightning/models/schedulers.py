"""Learning-rate schedules as per-iteration multipliers of each group's base LR (so group ratios always hold).

Each factory takes the optimizer and the run's length in optimizer steps and returns a `LambdaLR`; Hydra configs
hold them as `_partial_` so the module supplies the steps once the trainer knows them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def sgdr_factor(step: int, cycle_steps: int, cycle_mult: float, min_lr_ratio: float) -> float:
    """Cosine annealing with warm restarts (Loshchilov & Hutter): first cycle `cycle_steps`, each next `cycle_mult`x."""
    cycle_start, length = 0, cycle_steps
    while step >= cycle_start + length:
        cycle_start += length
        length = max(1, round(length * cycle_mult))
    progress = (step - cycle_start) / length
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def restart_steps(total_steps: int, cycle_steps: int, cycle_mult: float) -> list[int]:
    """Steps at which a new SGDR cycle begins (the LR jumps back up), within `total_steps`."""
    starts, start, length = [], 0, cycle_steps
    while start + length < total_steps:
        start += length
        starts.append(start)
        length = max(1, round(length * cycle_mult))
    return starts


def _with_warmup(factor: Callable[[int], float], warmup_steps: int) -> Callable[[int], float]:
    if warmup_steps <= 0:
        return factor
    return lambda step: factor(step) * min(1.0, (step + 1) / warmup_steps)


def _steps(value: float, unit: str, steps_per_epoch: int) -> int:
    return max(1, round(value * steps_per_epoch)) if unit == "epochs" else max(1, int(value))


def sgdr(optimizer: Optimizer, total_steps: int, steps_per_epoch: int, cycle: float = 1.0, cycle_unit: str = "epochs",
         cycle_mult: float = 2.0, min_lr_ratio: float = 0.01, warmup_steps: int = 0) -> LambdaLR:
    cycle_steps = _steps(cycle, cycle_unit, steps_per_epoch)
    return LambdaLR(optimizer, _with_warmup(lambda s: sgdr_factor(s, cycle_steps, cycle_mult, min_lr_ratio),
                                            warmup_steps))


def cosine(optimizer: Optimizer, total_steps: int, steps_per_epoch: int, min_lr_ratio: float = 0.01,
           warmup_steps: int = 0) -> LambdaLR:
    def factor(step: int) -> float:
        progress = min(1.0, step / max(1, total_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, _with_warmup(factor, warmup_steps))


def constant(optimizer: Optimizer, total_steps: int, steps_per_epoch: int, warmup_steps: int = 0) -> LambdaLR:
    return LambdaLR(optimizer, _with_warmup(lambda step: 1.0, warmup_steps))
