"""Fast defaults where the run lands: bf16 autocast and channels_last on a CUDA GPU, fp32 and NCHW on a CPU.

`trainer.precision: auto` and `channels_last: auto` (the defaults) are replaced here, before anything is built, by
what suits the device the trainer will use; any value the user sets is kept. On a GPU, bf16-mixed trains ResNet50
several times faster than fp32 (NVIDIA's reference: 2470 vs 938 img/s on an A100) and channels_last lets cuDNN use
tensor-core kernels without layout transposes (timm reports +47 %); on a CPU neither pays.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

AUTO = "auto"


def lands_on_cuda(accelerator: object) -> bool:
    """Whether Lightning's `accelerator` setting will train on a CUDA device on this machine."""
    import torch

    return str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def cuda_precision() -> str:
    import torch

    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"  # pre-Ampere GPUs: fp16 autocast


def resolve_speed_defaults(cfg: DictConfig) -> dict[str, object]:
    """Replace `auto` in cfg.trainer.precision and cfg.channels_last; returns the settings chosen by `auto`."""
    cuda = lands_on_cuda(cfg.trainer.get("accelerator", "auto"))
    chosen: dict[str, object] = {}
    with open_dict(cfg):
        if str(cfg.trainer.get("precision", AUTO)) == AUTO:
            cfg.trainer.precision = chosen["precision"] = cuda_precision() if cuda else "32-true"
        if str(cfg.get("channels_last", AUTO)) == AUTO:
            cfg.channels_last = chosen["channels_last"] = cuda
    if chosen:
        device = "a CUDA GPU" if cuda else "the CPU"
        log.info("speed defaults for %s: %s (set trainer.precision / channels_last to choose)", device,
                 ", ".join(f"{key}={value}" for key, value in chosen.items()))
    return chosen
