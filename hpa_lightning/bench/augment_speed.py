"""Section 4: the kornia augmentation's share of a training step."""

from __future__ import annotations

import torch

from hpa_lightning.bench.common import time_call


def bench_augment(module, batch: dict, device: torch.device, iters: int, amp_dtype: torch.dtype | None = None) -> dict:
    """The augmentation's time vs a whole training step (transform + forward + loss + backward + optimizer step)."""
    module = module.to(device).train()
    images = batch["image"].to(device)
    targets = batch["target"].to(device)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    transform = module.transform
    channels_last = getattr(module, "channels_last", False)

    def augment_only():
        with torch.no_grad():
            transform.augment(images.float().div_(255.0))

    def transform_no_augment():
        with torch.no_grad():
            transform(images, train=False)

    def step():
        x = transform(images, train=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = module.criterion(module(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t_aug = time_call(augment_only, device, iters * 2)
    t_std = time_call(transform_no_augment, device, iters * 2)
    t_step = time_call(step, device, iters)
    return {"ratio": t_aug / t_step, "augment_ms": t_aug * 1e3, "to_float_standardize_ms": t_std * 1e3,
            "step_ms": t_step * 1e3, "batch_size": int(images.shape[0]), "image_size": int(images.shape[-1]),
            "device": str(device), "model": module.hparams.model["name"]}
