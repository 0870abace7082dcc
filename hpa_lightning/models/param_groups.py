"""Optimizer parameter groups of a network: its whole head (what `forward_head` runs), the poster's three depth groups
(lr/9, lr/3, lr) or layer-wise LR decay over timm's group matcher, and no weight decay where decaying only shrinks a
scale (norms, biases, position embeddings)."""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Sequence

from timm.models import group_parameters
from torch import nn

from hpa_lightning.models.meta import run_on_meta
from hpa_lightning.models.net import _one_line

log = logging.getLogger(__name__)

def head_parameter_names(model: nn.Module) -> frozenset[str]:
    """The names of the parameters `forward_head` uses: the architecture's whole head (ConvNeXt's and MaxViT's
    head.norm and pre-logits, a ViT's fc_norm with average pooling, DeiT's distillation head), not only
    `get_classifier()`. Found by running the network once on the meta device (`net.run_on_meta`); where that cannot run
    (a network of the user's own), `get_classifier()`'s parameters."""
    called: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda _m, _a, name=name: called.append(name))
             for name, module in model.named_modules()]
    try:
        run_on_meta(model, called=called)
    except Exception as err:  # noqa: BLE001 - any network the meta device cannot run: fall back to the classifier
        log.info("the head is taken to be get_classifier() alone: the network does not run on the meta device "
                 "(%s)", _one_line(err))
        ids = {id(p) for p in model.get_classifier().parameters()}
        return frozenset(n for n, p in model.named_parameters() if id(p) in ids)
    finally:
        for hook in hooks:
            hook.remove()
    names = set()
    for module_name in set(called):
        prefix = f"{module_name}." if module_name else ""
        names |= {prefix + n for n, _ in model.get_submodule(module_name).named_parameters(recurse=False)}
    own = {n for n, _ in model.named_parameters()}
    return frozenset(names & own)  # shared (tied) parameters appear once, under their first name


def _layer_map(model: nn.Module, coarse: bool) -> dict[str, int]:
    """Parameter name -> depth ordinal from timm's group matcher (stem 0, then stages or blocks), or timm's own
    fallback for architectures without one (groups of 12 parameters in order, `auto_group_layers`)."""
    if hasattr(model, "group_matcher"):
        return group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
    from timm.optim import auto_group_layers

    return auto_group_layers(model)


def _no_weight_decay(model: nn.Module) -> set[str]:
    """timm's own list of parameters exempt from weight decay (position embeddings, class and register tokens,
    relative position tables); names or wildcard patterns."""
    return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()


def depth_groups(model: nn.Module, n_groups: int = 3,
                 head: frozenset[str] | None = None) -> list[list[tuple[str, nn.Parameter]]]:
    """Split parameters into `n_groups` by depth: the whole head alone last, the body's coarse stages (timm's group
    matcher) spread over the rest."""
    head = head_parameter_names(model) if head is None else head
    body_stage = _layer_map(model, coarse=True)
    body_stages = sorted({body_stage.get(n, math.inf) for n, _ in model.named_parameters() if n not in head})
    groups: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(n_groups)]
    for name, param in model.named_parameters():
        if name in head:
            groups[-1].append((name, param))
            continue
        # stage position 0..1 over the body -> one of the first n_groups - 1 groups
        position = body_stages.index(body_stage.get(name, math.inf)) / max(1, len(body_stages))
        groups[min(n_groups - 2, int(position * (n_groups - 1)))].append((name, param))
    return groups


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    if len(common) == min(len(p) for p in parts):  # one parameter alone: name its module
        common = common[:-1]
    return ".".join(common)


def _layer_label(names: list[str]) -> str:
    """What a layer holds, from its parameter names: their common module (`blocks.3`), or the common module of each
    top-level part joined (`blocks.11+norm`: timm's matcher puts the final norm with the last block)."""
    common = _common_prefix(names)
    if common:
        return common
    parts: dict[str, list[str]] = {}
    for name in names:
        parts.setdefault(name.split(".")[0], []).append(name)
    return "+".join(_common_prefix(group) or top for top, group in parts.items())


NamedParameters = list[tuple[str, nn.Parameter]]


def layer_groups(model: nn.Module, head: frozenset[str] | None = None) -> list[tuple[str, NamedParameters]]:
    """Parameters by layer, from the input to the head: timm's fine-grained group matcher (a ViT's stem and each
    block, the final norm with the last; a Swin's blocks stage by stage), the whole head last. Each layer is named
    for what it holds (`stem`, `blocks.3`, `layers.2.blocks.1`, `blocks.11+norm`, `head`) so the LR trace reads as
    the network does."""
    head = head_parameter_names(model) if head is None else head
    layer_of = _layer_map(model, coarse=False)
    top = max(layer_of.values(), default=0) + 1
    layers: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        layers.setdefault(top if name in head else layer_of.get(name, top), []).append((name, param))
    named = []
    for index, layer in enumerate(sorted(layers)):
        params = layers[layer]
        label = "head" if layer == top else "stem" if index == 0 else _layer_label([n for n, _ in params])
        if label in {n for n, _ in named}:
            label = f"{label}_{index}"
        named.append((label, params))
    return named


def _split_decay(group_name: str, params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                 exempt: set[str]) -> list[dict]:
    """A named group as two optimizer groups, with and without weight decay (`<name>_no_decay`): norms, biases and
    timm's exempt parameters get none, since decaying them only shrinks the scale or position they model."""
    def decays(name: str, param: nn.Parameter) -> bool:
        return param.ndim > 1 and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exempt)

    decay = [p for n, p in params if decays(n, p)]
    no_decay = [p for n, p in params if not decays(n, p)]
    result = []
    if decay:
        result.append({"name": group_name, "params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        result.append({"name": f"{group_name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return result


def parameter_groups(model: nn.Module, lr: float, lr_ratios: Sequence[float] = (1 / 9, 1 / 3, 1.0),
                     weight_decay: float = 0.0, names: Sequence[str] | None = None,
                     layer_decay: float | None = None, head: frozenset[str] | None = None) -> list[dict]:
    """Optimizer parameter groups, the head's LR being `lr`.

    Without `layer_decay`: the poster's depth groups with LRs rising toward the head (fastai's lr/9, lr/3, lr).
    With it: layer-wise LR decay (BEiT, MAE, DINOv2 fine-tuning), each layer's LR the next one's times
    `layer_decay`, from the input (lr * layer_decay ** depth) to the head (lr).
    Each group also has a `_no_decay` twin without weight decay (see `_split_decay`).
    """
    head = head_parameter_names(model) if head is None else head
    exempt = _no_weight_decay(model)
    result = []
    if layer_decay is not None:
        layers = layer_groups(model, head)
        for depth, (group_name, params) in enumerate(layers):
            scale = float(layer_decay) ** (len(layers) - 1 - depth)
            result += _split_decay(group_name, params, lr * scale, weight_decay, exempt)
        return result
    if names is None:
        names = ["early", "late", "head"] if len(lr_ratios) == 3 else [f"group{i}" for i in range(len(lr_ratios))]
    for group_name, ratio, params in zip(names, lr_ratios, depth_groups(model, len(lr_ratios), head), strict=True):
        result += _split_decay(group_name, params, lr * ratio, weight_decay, exempt)
    return result
