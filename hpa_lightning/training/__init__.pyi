from .callbacks import FiniteCheckpointGuard, FreezeBackbone, InterruptCheckpoint, LRTrace, RNGState
from .finetune import resolve_recipe
from .job import build_module, prepare_datamodule, train

__all__ = [
    "FiniteCheckpointGuard",
    "FreezeBackbone",
    "InterruptCheckpoint",
    "LRTrace",
    "RNGState",
    "build_module",
    "prepare_datamodule",
    "resolve_recipe",
    "train",
]
