"""A network run for its shapes only: on the meta device, with meta copies of its weights (no memory, no compute,
the weights untouched), to find what its head runs and which input sizes it takes before any data is read."""

from __future__ import annotations

import torch
from timm.models import get_model_input_config
from torch import Tensor, nn

from hpa_lightning.models.net import _one_line, _patch_size


class _FeaturesThenHead(nn.Module):
    """forward_features, then forward_head, noting which modules the head ran (`called` is cleared in between)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, called: list[str]) -> Tensor:
        features = self.net.forward_features(x)
        called.clear()
        return self.net.forward_head(features)


def run_on_meta(model: nn.Module, size: tuple[int, int] | None = None, called: list[str] | None = None) -> None:
    """Run `model` (forward_features, then forward_head) on a meta-device input of `size` (default: the size timm
    says it takes) with meta copies of its weights: shapes only, no memory, no compute, the weights untouched."""
    channels, height, width = get_model_input_config(model)["input_size"]
    height, width = size or (height, width)
    tensors = {f"net.{k}": torch.empty_like(v, device="meta")
               for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with torch.no_grad():
        torch.func.functional_call(_FeaturesThenHead(model), tensors,
                                   (torch.empty(1, channels, height, width, device="meta"), [] if called is None
                                    else called))


def cannot_take(model: nn.Module, size: int) -> str | None:
    """None when the built `model` runs on `size` px inputs, else why not (one line): a fixed-size ViT or Swin
    without dynamic image size, an image too small for a CNN, a size that is not a multiple of the patch size."""
    patch = _patch_size(model)
    if patch and size % patch:
        return (f"{size} px is not a multiple of its {patch} px patches: the last {size % patch} px of each row and "
                f"column would be dropped")
    try:
        run_on_meta(model, (size, size))
    except Exception as err:  # noqa: BLE001 - whatever it raises, it cannot take that size
        return _one_line(err, 160)
    return None
