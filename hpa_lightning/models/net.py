"""The network: a timm backbone with a 4-channel stem (the poster's rule) and depth-wise parameter groups."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from hpa_lightning.classes import NUM_CLASSES
from hpa_lightning.errors import ConfigError, PretrainedUnavailable

log = logging.getLogger(__name__)


def is_pretrained(value: bool | str | None) -> bool:
    """Whether `model.pretrained` asks for weights: true, or a path; false, null and "" (also as strings) do not."""
    return value not in (False, None, "", "false", "False")


def rgb_stem_to_rgby(weight: torch.Tensor) -> torch.Tensor:
    """(out, 3, k, k) RGB filters -> (out, 4, k, k): R, G, B kept unchanged, Y initialised from R (poster, fig. 2)."""
    if weight.shape[1] != 3:
        raise ValueError(f"expected a 3-channel stem, got {tuple(weight.shape)}")
    return torch.cat([weight, weight[:, :1]], dim=1)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedUnavailable(f"model.pretrained={path}: file not found")
    # timm's reader: safetensors, or torch.load(weights_only=True); unwraps `state_dict` / `model` (EMA weights first)
    # and strips DataParallel's `module.` prefixes
    return timm.models.load_state_dict(str(path), weights_only=True)


def pretrained_rgb_state(name: str, pretrained: bool | str) -> dict[str, torch.Tensor]:
    """ImageNet weights of the 3-channel `name`: from timm's usual source (True) or a local file (a path)."""
    if isinstance(pretrained, str):
        return _read_state_dict(Path(pretrained).expanduser())
    try:
        return timm.create_model(name, pretrained=True, in_chans=3).state_dict()
    except Exception as err:  # hub errors come in many types (offline, missing file, HTTP)
        raise PretrainedUnavailable(
            f"cannot fetch pretrained ImageNet weights for {name} ({type(err).__name__}); either download them and set "
            f"model.pretrained=/path/to/{name}.safetensors, or train from scratch with model.pretrained=false"
        ) from None


def build_network(name: str, num_classes: int, in_chans: int = 4, global_pool: str | None = None,
                  **kwargs) -> nn.Module:
    """timm's `name` with `in_chans` inputs and `num_classes` outputs; a name or pooling timm does not know is one
    line naming the config key (`ConfigError`). `global_pool` None keeps the architecture's own pooling."""
    if not isinstance(name, str) or not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5] if isinstance(name, str) else []
        raise ConfigError(f"model.name={name!r}: not a timm architecture"
                          + (f" (similar: {', '.join(close)})" if close else " (see timm.list_models())"))
    pool = {} if global_pool in (None, "null") else {"global_pool": global_pool}
    try:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes, **pool, **kwargs)
    except (AssertionError, KeyError, ValueError, TypeError) as err:
        what = f"model.global_pool={global_pool!r}" if pool else f"model.name={name!r}"
        raise ConfigError(f"{what}: timm cannot build {name} with it ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no message'})") from None


def create_model(name: str = "resnet50", pretrained: bool | str = False, num_classes: int = NUM_CLASSES,
                 drop_rate: float = 0.0, global_pool: str | None = None) -> nn.Module:
    """The 4-channel `name`, with pretrained weights when `pretrained` asks for them (else `PretrainedUnavailable`).

    Pretrained weights are those of the 3-channel model with its first convolution (timm's `first_conv` of the
    architecture, whatever its name) widened to R, G, B, Y: the RGB filters kept, Y's a copy of R's (the poster's
    rule); the classifier is new (28 classes, and twice the features with `global_pool=catavgmax`).
    """
    model = build_network(name, num_classes, global_pool=global_pool, drop_rate=drop_rate)
    if not is_pretrained(pretrained):
        return model
    state = pretrained_rgb_state(name, True if pretrained in (True, "true", "True") else str(pretrained))
    stem_key = f"{model.pretrained_cfg['first_conv']}.weight"
    classifier = model.pretrained_cfg["classifier"]
    if stem_key not in state:
        raise PretrainedUnavailable(f"model.pretrained: weights have no {stem_key!r}; are they for timm's {name}?")
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}  # new 28-way head
    state[stem_key] = rgb_stem_to_rgby(state[stem_key])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(f"{classifier}.")]
    if missing or unexpected:
        raise PretrainedUnavailable(f"model.pretrained: weights do not fit timm's {name}: "
                                    f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def head_module(model: nn.Module) -> nn.Module:
    return model.get_classifier()


def depth_groups(model: nn.Module, n_groups: int = 3) -> list[list[tuple[str, nn.Parameter]]]:
    """Split parameters into `n_groups` by depth: the head alone last, the body's coarse stages spread over the rest.

    Uses timm's group matcher (stem, stage 1..k), so it works for any timm architecture that defines one.
    """
    from timm.models import group_parameters

    head_ids = {id(p) for p in head_module(model).parameters()}
    body_stage = {}
    for stage, names in group_parameters(model, model.group_matcher(coarse=True)).items():
        for name in names:
            body_stage[name] = stage
    body_stages = sorted({s for n, s in body_stage.items() if id(model.get_parameter(n)) not in head_ids})
    groups: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(n_groups)]
    for name, param in model.named_parameters():
        if id(param) in head_ids:
            groups[-1].append((name, param))
            continue
        # stage position 0..1 over the body -> one of the first n_groups - 1 groups
        position = body_stages.index(body_stage[name]) / max(1, len(body_stages))
        groups[min(n_groups - 2, int(position * (n_groups - 1)))].append((name, param))
    return groups


def parameter_groups(model: nn.Module, lr: float, lr_ratios: Sequence[float] = (1 / 9, 1 / 3, 1.0),
                     weight_decay: float = 0.0, names: Sequence[str] | None = None) -> list[dict]:
    """Optimizer parameter groups with learning rates rising toward the head (fastai's lr/9, lr/3, lr).

    Norm and bias parameters (ndim <= 1) get no weight decay: decaying them only shrinks the scale they model.
    """
    if names is None:
        names = ["early", "late", "head"] if len(lr_ratios) == 3 else [f"group{i}" for i in range(len(lr_ratios))]
    result = []
    for group_name, ratio, params in zip(names, lr_ratios, depth_groups(model, len(lr_ratios)), strict=True):
        decay = [p for n, p in params if p.ndim > 1]
        no_decay = [p for n, p in params if p.ndim <= 1]
        if decay:
            result.append({"name": group_name, "params": decay, "lr": lr * ratio, "weight_decay": weight_decay})
        if no_decay:
            result.append({"name": f"{group_name}_no_decay", "params": no_decay, "lr": lr * ratio,
                           "weight_decay": 0.0})
    return result
