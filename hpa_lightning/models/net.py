"""The network: any timm backbone with a 4-channel R, G, B, Y input, built at the run's image size, and its
parameter groups.

- The input: 3-channel weights get the poster's rule on their first layer, whatever it is (a stem convolution or a
  ViT's patch embedding): R, G, B kept, Y = R. Weights that already have 4 or more channels (HPA-pretrained
  foundation models) are reordered to R, G, B, Y (`pretrained_channels` names their order), not widened.
- The image size: architectures that fix it at construction (ViT, DeiT, EVA, DINOv2, Swin, MaxViT: timm's
  `fixed_input_size`) are built for the run's size with whatever depends on it (Swin's windows, MaxViT's partitions)
  as timm's own `set_input_size` derives it; their pretrained position embeddings and relative position tables are
  resampled by the architecture's own checkpoint filter when the weights are loaded.
- The head: everything `forward_head` runs (classifier, head norm, pre-logits), found by running the network once on
  the meta device; it is what the frozen first stage trains and the last LR group.
- The LR groups: the poster's three depth groups (lr/9, lr/3, lr), or layer-wise LR decay over timm's group matcher.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import timm
import torch
from timm.models import get_model_args, get_model_input_config, get_model_traits, group_parameters
from torch import Tensor, nn

from hpa_lightning.classes import CHANNELS, NUM_CLASSES
from hpa_lightning.errors import ConfigError, PretrainedUnavailable

log = logging.getLogger(__name__)

RGB: tuple[str, ...] = ("red", "green", "blue")

HF_HUB = "hf-hub:"

# construction arguments that are not about the input size (get_model_args reports them too)
_NOT_SIZE_ARGS = ("in_chans", "num_classes", "global_pool")


def is_pretrained(value: bool | str | None) -> bool:
    """Whether `model.pretrained` asks for weights: true, a path or an hf-hub: id; false, null and "" (also as
    strings) do not."""
    return value not in (False, None, "", "false", "False")


def rgb_stem_to_rgby(weight: Tensor) -> Tensor:
    """(out, 3, ...) RGB filters -> (out, 4, ...): R, G, B kept unchanged, Y initialised from R (poster, fig. 2)."""
    if weight.shape[1] != 3:
        raise ValueError(f"expected a 3-channel stem, got {tuple(weight.shape)}")
    return torch.cat([weight, weight[:, :1]], dim=1)


def check_pretrained_channels(channels: Sequence[str] | None) -> tuple[str, ...] | None:
    """`model.pretrained_channels` as a tuple of lower-case names, or a one-line `ConfigError`: three channels must
    be red, green and blue (the poster's rule adds Y = R); four or more must name all of red, green, blue, yellow
    (the others are left out: their filters see no input here)."""
    if channels is None:
        return None
    if isinstance(channels, str) or not all(isinstance(c, str) for c in channels):
        raise ConfigError(f"model.pretrained_channels={channels!r}: expected a list of channel names in the order of "
                          f"the weights' input channels, e.g. [red, yellow, blue, green]")
    names = tuple(c.lower() for c in channels)
    key = f"model.pretrained_channels=[{', '.join(names)}]"
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: a channel named twice")
    if len(names) == 3 and set(names) == set(RGB):
        return names
    if len(names) >= 4 and set(CHANNELS) <= set(names):
        return names
    if len(names) == 3:
        raise ConfigError(f"{key}: 3-channel weights must be red, green and blue (in any order), widened by the "
                          f"poster's rule (Y = R)")
    missing = [c for c in CHANNELS if c not in names]
    raise ConfigError(f"{key}: {len(names)} channels fit no rule: 3 (red, green, blue: Y = R is added) or 4 and more "
                      f"naming all of {', '.join(CHANNELS)}" + (f" (missing {', '.join(missing)})" if missing else ""))


def first_layer_to_rgby(weight: Tensor, channels: Sequence[str] = RGB) -> Tensor:
    """(out, N, ...) first-layer weights whose inputs are `channels` -> (out, 4, ...) taking R, G, B, Y.

    Three channels (red, green, blue in any order): the poster's rule, RGB filters unchanged and Y = R. Four or more:
    the weights already see the project's channels, so they are reordered (and channels the project has not are
    left out), never widened.
    """
    channels = check_pretrained_channels(channels) or RGB
    if weight.shape[1] != len(channels):
        raise ValueError(f"first layer has {weight.shape[1]} input channels, {len(channels)} named")
    if len(channels) == 3:
        return rgb_stem_to_rgby(weight[:, [channels.index(c) for c in RGB]])
    return weight[:, [channels.index(c) for c in CHANNELS]].clone()


def first_layers(model: nn.Module) -> tuple[str, ...]:
    """The input layer(s) of a timm model (timm's `first_conv`: `conv1`, `features.conv0`, `patch_embed.proj`)."""
    first = get_model_traits(model).get("first_conv") or getattr(model, "pretrained_cfg", {}).get("first_conv")
    if not first:
        raise ConfigError(f"{type(model).__name__}: timm names no first layer (first_conv) for it; the RGBY rule "
                          f"needs one")
    return (first,) if isinstance(first, str) else tuple(first)


# ------------------------------------------------------------------------------------------------ image size


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not timm.is_model(name):
        if isinstance(name, str) and name.startswith(HF_HUB):
            raise ConfigError(f"model.name={name}: name the architecture (model.name=<timm architecture>) and the "
                              f"weights with model.pretrained={name}; checkpoints and exports rebuild the network "
                              f"offline from its name")
        close = timm.list_models(f"*{name}*")[:5] if isinstance(name, str) else []
        raise ConfigError(f"model.name={name!r}: not a timm architecture"
                          + (f" (similar: {', '.join(close)})" if close else " (see timm.list_models())"))
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # a known architecture with a tag it does not have
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{name.split('.')[0]}.*")][:6]
        raise ConfigError(f"model.name={name}: timm has no such pretrained tag"
                          + (f" (it has: {', '.join(tags)})" if tags else "")) from None
    return name


def _meta_network(name: str, **kwargs) -> nn.Module:
    """`name` built on the meta device: its structure without memory or initialisation cost."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


@functools.lru_cache(maxsize=64)  # a pure function of timm's registry: asked by the config checks and each build
def takes_image_size(name: str) -> bool:
    """Whether `name` fixes its input size at construction (timm's `fixed_input_size`: ViT, Swin, EVA, MaxViT...);
    CNNs take any size and refuse an `img_size` argument."""
    cfg = timm.models.get_pretrained_cfg(_check_name(name))
    if cfg is not None and not cfg.fixed_input_size:
        return False
    return get_model_traits(_meta_network(name)).get("img_size") is not None


@functools.lru_cache(maxsize=64)
def offers_dynamic_image_size(name: str) -> bool:
    """Whether timm's `name` takes `dynamic_img_size` (ViT, DeiT, EVA, DINOv2, Swin; not MaxViT)."""
    try:
        _meta_network(name, dynamic_img_size=True)
    except TypeError:
        return False
    return True


def image_size_arguments(name: str, img_size: int | str | None, dynamic_img_size: bool | str | None = False) -> dict:
    """timm's construction arguments that make `name` take `img_size` px images: none for architectures that take
    any size; for the others `img_size` and what depends on it, as timm's own `set_input_size` derives it from the
    architecture's defaults (Swin: windows scaled with the patch grid, so the last stage is one window as at 224 px;
    MaxViT: its window and grid partitions), plus `dynamic_img_size` when asked for (any input size at run time,
    position embeddings resampled on the fly: full images evaluated after training on crops).

    None or "auto" for `img_size` keeps the architecture's own size (a node instantiated by hand).
    """
    size = None if img_size in (None, "auto") else int(img_size)
    dynamic = dynamic_img_size is True or dynamic_img_size in ("true", "True")
    return dict(_image_size_arguments(name, size, dynamic))


@functools.lru_cache(maxsize=64)  # each build asks, and deriving it builds the architecture on the meta device
def _image_size_arguments(name: str, size: int | None, dynamic: bool) -> dict:
    if (size is None and not dynamic) or not takes_image_size(name):
        return {}
    args: dict = {}
    if size is not None:
        probe = _meta_network(name)
        if hasattr(probe, "set_input_size"):
            try:
                probe.set_input_size(img_size=(size, size))
            except Exception as err:  # noqa: BLE001 - e.g. MaxViT's partitions of too small an image
                raise _SizeError(name, size, _one_line(err)) from None
            args = {k: v for k, v in get_model_args(probe).items() if k not in _NOT_SIZE_ARGS}
        else:  # a fixed-size architecture without timm's resize (LeViT): its size alone
            args = {"img_size": size}
    return {**args, **({"dynamic_img_size": True} if dynamic else {})}


class _SizeError(ConfigError):
    """timm cannot derive what depends on the size (windows, partitions) for this size; `reason` says why."""

    def __init__(self, name: str, size: int, reason: str):
        super().__init__(f"model.name={name}: timm cannot size it for {size} px images ({reason}); set "
                         f"data.image_size (or crop.size) to a size it takes")
        self.reason = reason


def _patch_size(model: nn.Module) -> int | None:
    """The patch size of a patch-embedding model that drops the pixels beyond the last whole patch (timm's
    PatchEmbed without `dynamic_img_pad`); None for other first layers."""
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None or getattr(patch_embed, "dynamic_img_pad", False):
        return None
    return int(max(patch)) if isinstance(patch, (tuple, list)) else int(patch)


def _runs_at(name: str, global_pool: str | None, img_size: int, dynamic: bool, sizes: Sequence[int]) -> str | None:
    """None when `name` built for `img_size` px takes each of `sizes` (`cannot_take`, on the meta device), else why
    not (one line)."""
    try:
        size_args = image_size_arguments(name, img_size, dynamic)
        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False, in_chans=len(CHANNELS), num_classes=NUM_CLASSES,
                                    **({"global_pool": global_pool} if global_pool not in (None, "null") else {}),
                                    **size_args)
    except _SizeError as err:
        return err.reason
    except Exception as err:  # noqa: BLE001 - built at its own size it was fine: what fails here is the size
        return _one_line(err, 160)
    return next((why for why in (cannot_take(net.eval(), size) for size in sizes) if why), None)


def _candidates(size: int, unit: int, limit: int = 24) -> Iterator[int]:
    """Sizes near `size`, nearest first: multiples of `unit` (the patch size, else 8 px)."""
    below, above = (size // unit) * unit, (size // unit + 1) * unit
    found = 0
    while found < limit and (below >= unit or found == 0):
        for candidate in sorted((below, above), key=lambda c: (abs(c - size), c)):
            if candidate >= unit and candidate != size:
                found += 1
                yield candidate
        below, above = below - unit, above + unit


def check_image_size(name: str, img_size: int, size_key: str, global_pool: str | None = None,
                     dynamic_img_size: bool = False, eval_size: int | None = None) -> None:
    """One line (`ConfigError`) naming model.name, the size key and the nearest size that works when `name` cannot
    run at `img_size` (or, trained on crops with dynamic image size, evaluate at `eval_size`): a fixed partition
    (MaxViT), too small an input (Inception, ConvNeXt), or a size that is not a multiple of the patch size."""
    with torch.device("meta"):  # a name, pooling or dynamic size timm cannot build at all: that one line first
        _build(_check_name(name), NUM_CLASSES, len(CHANNELS), global_pool,
               {"dynamic_img_size": True} if dynamic_img_size else {})
    why = _runs_at(name, global_pool, img_size, dynamic_img_size, [img_size])
    if why is None:
        if eval_size and eval_size != img_size:
            why = _runs_at(name, global_pool, img_size, dynamic_img_size, [eval_size])
            if why is not None:
                raise ConfigError(f"model.name={name} trained on {size_key}={img_size} crops cannot evaluate the full "
                                  f"data.image_size={eval_size} images ({why}); set crop.eval=center")
        return
    patch = _patch_size(_meta_network(name))  # the patch size does not depend on the image size
    for candidate in _candidates(img_size, patch or 8):
        if _runs_at(name, global_pool, candidate, dynamic_img_size, [candidate]) is None:
            raise ConfigError(f"model.name={name} cannot run at {size_key}={img_size} ({why}); the nearest size that "
                              f"works is {size_key}={candidate}")
    raise ConfigError(f"model.name={name} cannot run at {size_key}={img_size} ({why}); no size near it works either")


# ------------------------------------------------------------------------------------------------ building


def build_network(name: str, num_classes: int, in_chans: int = 4, global_pool: str | None = None,
                  img_size: int | str | None = None, dynamic_img_size: bool | str | None = False,
                  **kwargs) -> nn.Module:
    """timm's `name` with `in_chans` inputs and `num_classes` outputs, built for `img_size` px where the architecture
    fixes its size (see `image_size_arguments`); a name, pooling or size timm cannot build is one line naming the
    config key (`ConfigError`). `global_pool` None keeps the architecture's own pooling."""
    _check_name(name)
    return _build(name, num_classes, in_chans, global_pool, image_size_arguments(name, img_size, dynamic_img_size),
                  **kwargs)


def _build(name: str, num_classes: int, in_chans: int, global_pool: str | None, size_args: dict,
           **kwargs) -> nn.Module:
    pool = {} if global_pool in (None, "null") else {"global_pool": global_pool}
    try:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes, **pool,
                                 **size_args, **kwargs)
    except (AssertionError, KeyError, ValueError, TypeError) as err:
        if isinstance(err, TypeError) and "dynamic_img_size" in str(err):
            what = "model.dynamic_img_size=true (evaluating full images after training on crops)"
        else:
            what = f"model.global_pool={global_pool!r}" if pool else f"model.name={name!r}"
        raise ConfigError(f"{what}: timm cannot build {name} with it ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no message'})") from None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise PretrainedUnavailable(f"model.pretrained={path}: file not found")
    # timm's reader: safetensors, or torch.load(weights_only=True); unwraps `state_dict` / `model` (EMA weights first)
    # and strips DataParallel's `module.` prefixes
    return timm.models.load_state_dict(str(path), weights_only=True)


def _one_line(err: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {' '.join(lines[:3])[:limit]}" if lines else type(err).__name__


def pretrained_network(name: str, pretrained: bool | str, channels: tuple[str, ...] | None = None,
                       global_pool: str | None = None, **size_args) -> tuple[nn.Module, tuple[str, ...]]:
    """The headless timm `name` with its pretrained weights, built with as many input channels as the weights have
    and at the size of `size_args`, loaded by timm's own path (the architecture's checkpoint filter resamples position
    embeddings, relative position tables and patch kernels); returns it and the names of its input channels.

    `pretrained`: True (timm's source for `name`, tag included), `hf-hub:org/repo`, or a local file saved at any size.
    """
    channels = check_pretrained_channels(channels)
    cfg = timm.models.get_pretrained_cfg(name)
    source_size = tuple((cfg.input_size if cfg else (3, 224, 224))[1:])
    first_conv = (cfg.first_conv if cfg else None) or ""
    first = f"{first_conv if isinstance(first_conv, str) else first_conv[0]}.weight"
    overlay: dict = {}
    local = isinstance(pretrained, str) and not pretrained.startswith(HF_HUB) and pretrained not in ("true", "True")
    if local:
        path = Path(pretrained).expanduser()
        state = _read_state_dict(path)
        # the classifier is replaced anyway: dropped here and built headless, so timm loads everything else strictly
        classifiers = (cfg.classifier if cfg else None) or ()
        for prefix in (classifiers,) if isinstance(classifiers, str) else classifiers:
            state = {k: v for k, v in state.items() if not k.startswith(f"{prefix}.")}
        found = state[first].shape[1] if first in state and state[first].ndim >= 2 else None
        if found is not None and channels is None and found != 3:
            raise ConfigError(f"model.pretrained={path}: its first layer ({first}) takes {found} channels; name their "
                              f"order with model.pretrained_channels (e.g. [red, yellow, blue, green])")
        if found is not None and channels is not None and found != len(channels):
            raise ConfigError(f"model.pretrained_channels has {len(channels)} names, the weights' first layer "
                              f"({first}) takes {found} channels")
        overlay.update(state_dict=state, num_classes=0, source=None)
    elif isinstance(pretrained, str) and pretrained.startswith(HF_HUB):
        overlay.update(hf_hub_id=pretrained.removeprefix(HF_HUB), source="hf-hub")
    channels = channels or RGB
    if len(channels) != 3:
        overlay["input_size"] = (len(channels), *source_size)  # what the weights take: loaded as they are
    pool = {} if global_pool in (None, "null") else {"global_pool": global_pool}
    try:
        source = timm.create_model(name, pretrained=True, in_chans=len(channels), num_classes=0, **pool, **size_args,
                                   pretrained_cfg_overlay=overlay or None)
    except Exception as err:  # hub errors come in many types (offline, missing file, HTTP), load errors as RuntimeError
        if local:
            raise PretrainedUnavailable(f"model.pretrained={pretrained}: weights do not fit timm's {name} "
                                        f"({_one_line(err)})") from None
        raise PretrainedUnavailable(
            f"cannot fetch pretrained weights for {name} ({_one_line(err, 160)}); either download them and set "
            f"model.pretrained=/path/to/{name}.safetensors, or train from scratch: +preset=scratch "
            f"(model.pretrained=false with the recipe that learns without pretrained weights)") from None
    return source, channels


def create_model(name: str = "resnet50", pretrained: bool | str = False, num_classes: int = NUM_CLASSES,
                 drop_rate: float = 0.0, global_pool: str | None = None, img_size: int | str | None = None,
                 dynamic_img_size: bool | str | None = False,
                 pretrained_channels: Sequence[str] | None = None) -> nn.Module:
    """The 4-channel (R, G, B, Y) `name` for `num_classes`, with pretrained weights when `pretrained` asks for them
    (else `PretrainedUnavailable`).

    One path for every source: the timm model with the weights' own channel count is built at `img_size` by timm's
    pretrained loading (`pretrained_network`), its first layer turned into R, G, B, Y (`first_layer_to_rgby`: the
    poster's rule for 3 channels, a reordering for weights that already have them, in the order
    `pretrained_channels` gives), and everything but the classifier copied into the 4-channel model built at the
    same size; the classifier is new (28 classes, and twice the features with `global_pool=catavgmax`).
    """
    channels = check_pretrained_channels(pretrained_channels)
    size_args = image_size_arguments(_check_name(name), img_size, dynamic_img_size)
    model = _build(name, num_classes, len(CHANNELS), global_pool, size_args, drop_rate=drop_rate)
    if not is_pretrained(pretrained):
        return model
    source, channels = pretrained_network(name, True if pretrained in (True, "true", "True") else str(pretrained),
                                          channels, global_pool, **size_args)
    state = source.state_dict()
    del source
    for layer in first_layers(model):
        key = f"{layer}.weight"
        if not isinstance(model.get_submodule(layer), nn.Conv2d) or key not in state:
            raise ConfigError(f"model.name={name}: its first layer {layer} is not a convolution; the RGBY rule "
                              f"cannot be applied to it")
        state[key] = first_layer_to_rgby(state[key], channels)
    missing, unexpected = model.load_state_dict(state, strict=False)
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    missing = [k for k in missing if not k.startswith(tuple(f"{c}." for c in classifiers))]
    if missing or unexpected:
        raise PretrainedUnavailable(f"model.pretrained: weights do not fit timm's {name}: "
                                    f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    log.info("pretrained weights loaded into %s: first layer %s from %s channels (%s)", name,
             ", ".join(first_layers(model)), len(channels),
             "Y = R, the poster's rule" if len(channels) == 3 else f"reordered from {', '.join(channels)}")
    return model


# ------------------------------------------------------------------------------------------------ head and groups


class _FeaturesThenHead(nn.Module):
    """forward_features, then forward_head, noting which modules the head ran (`called` is cleared in between)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, called: list[str]) -> Tensor:
        features = self.net.forward_features(x)
        called.clear()
        return self.net.forward_head(features)


def _on_meta(model: nn.Module, size: tuple[int, int] | None = None, called: list[str] | None = None) -> None:
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
        _on_meta(model, (size, size))
    except Exception as err:  # noqa: BLE001 - whatever it raises, it cannot take that size
        return _one_line(err, 160)
    return None


def head_parameter_names(model: nn.Module) -> frozenset[str]:
    """The names of the parameters `forward_head` uses: the architecture's whole head (ConvNeXt's and MaxViT's
    head.norm and pre-logits, a ViT's fc_norm with average pooling, DeiT's distillation head), not only
    `get_classifier()`. Found by running the network once on the meta device (`_on_meta`); where that cannot run
    (a network of the user's own), `get_classifier()`'s parameters."""
    called: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda _m, _a, name=name: called.append(name))
             for name, module in model.named_modules()]
    try:
        _on_meta(model, called=called)
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
