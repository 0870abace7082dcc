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
- The LR groups: hpa_lightning/models/param_groups.py.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import timm
import torch
from timm.models import get_model_args, get_model_traits
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
    from hpa_lightning.models.meta import cannot_take  # meta builds on this module's helpers

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
