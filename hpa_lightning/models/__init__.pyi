from .augment import DeviceTransform, Standardize
from .losses import FocalLoss, bce_loss, positive_class_weights
from .module import HPAModule
from .net import create_model
from .param_groups import parameter_groups
from .schedulers import constant, cosine, sgdr

__all__ = [
    "DeviceTransform",
    "FocalLoss",
    "HPAModule",
    "Standardize",
    "bce_loss",
    "constant",
    "cosine",
    "create_model",
    "parameter_groups",
    "positive_class_weights",
    "sgdr",
]
