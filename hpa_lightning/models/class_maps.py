"""Class activation maps: where in an image a trained network finds each class.

CAM (Zhou et al. 2016) where the head allows it, a linear classifier after global average pooling (timm's default
`avg` pool): the map of class c is sum_f W[c, f] A_f over the last feature map A, whose spatial mean plus the bias is
exactly the logit. Grad-CAM (Selvaraju et al. 2017) for any other head (e.g. `global_pool=catavgmax`): the feature
maps weighted by the spatial mean of the class logit's gradient, through a ReLU. Written here rather than taken from
the `grad-cam` package, which would bring the GUI build of OpenCV and torchvision for these few lines; the tests hold
both methods to the identities above. Drawn over images by `reporting/cam.py`, measured inside cells by
`inference/cell_scoring.py`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CAM_METHODS = ("auto", "cam", "gradcam")


def cam_applies(net: nn.Module) -> bool:
    """A linear classifier right after global average pooling: the logits are linear in the last feature map."""
    pool = getattr(net, "global_pool", None)
    return isinstance(net.get_classifier(), nn.Linear) and getattr(pool, "pool_type", None) == "avg"


def raw_class_maps(net: nn.Module, x: Tensor, classes: Tensor, method: str = "auto") -> tuple[Tensor, str]:
    """Maps (B, K, h, w) at the last feature map's resolution for `classes` (B, K) of the standardised batch `x`,
    unscaled (CAM: signed; Grad-CAM: after its ReLU), and the method used."""
    if method not in CAM_METHODS:
        raise ValueError(f"method={method}: expected one of {', '.join(CAM_METHODS)}")
    if method == "auto":
        method = "cam" if cam_applies(net) else "gradcam"
    if method == "cam" and not cam_applies(net):
        raise ValueError("method=cam needs a linear classifier after average pooling; use method=gradcam")
    if method == "cam":
        with torch.no_grad():
            features = net.forward_features(x)
            weight = net.get_classifier().weight[classes]  # (B, K, F)
            return torch.einsum("bkf,bfhw->bkhw", weight, features.float()), method
    with torch.enable_grad():
        features = net.forward_features(x).detach().requires_grad_(True)
        logits = net.forward_head(features)
        maps = []
        for k in range(classes.shape[1]):
            chosen = logits.gather(1, classes[:, k:k + 1]).sum()
            (grad,) = torch.autograd.grad(chosen, features, retain_graph=k + 1 < classes.shape[1])
            alpha = grad.mean(dim=(2, 3), keepdim=True)
            maps.append(F.relu((alpha * features).sum(dim=1)))
    return torch.stack(maps, dim=1).detach(), method


def class_maps(net: nn.Module, x: Tensor, classes: Tensor, method: str = "auto") -> tuple[np.ndarray, str]:
    """(B, K, H, W) float maps in [0, 1] at the image's size: the positive part of each raw map over its maximum."""
    raw, used = raw_class_maps(net, x, classes, method)
    maps = F.interpolate(F.relu(raw), size=x.shape[-2:], mode="bilinear", align_corners=False)
    peak = maps.amax(dim=(2, 3), keepdim=True)
    return (maps / torch.where(peak > 0, peak, torch.ones_like(peak))).cpu().numpy(), used
