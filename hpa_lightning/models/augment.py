"""Device-side input pipeline: uint8 RGBY batches become standardised floats, augmented in training only.

Runs on whatever device the batch was moved to (Lightning's `on_after_batch_transfer`), so the loader only ships
uint8 and the GPU does the arithmetic. The four channels of a sample always get the same geometric transform.
"""

from __future__ import annotations

import contextlib
import random
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

import kornia.augmentation as K
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import Tensor, nn

from hpa_lightning.errors import ConfigError


class Standardize(nn.Module):
    """uint8 (B, C, H, W) -> float, standardised with per-channel train statistics given in [0, 1] units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean) / self.std


class RandomRot90(nn.Module):
    """Each sample turned by 0, 90, 180 or 270 degrees, the four equally likely, exactly (`torch.rot90`, no warp).

    Not kornia's `RandomRotation90(times=(0, 3))`: it rounds a continuous draw from [0, 3], so 0 and 270 degrees come
    up half as often as 90 and 180, and it rotates by interpolation.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"RandomRot90 needs square images, got {x.shape[-2]}x{x.shape[-1]}")
        turns = torch.randint(0, 4, (x.shape[0], *[1] * (x.ndim - 1)), device=x.device)
        # rot90 by k as a transpose (k odd) and flips (rows for k in 1, 2; columns for k in 2, 3), each chosen per
        # sample by torch.where: exact, and nothing is read back to the host (no nonzero, no index lists)
        x = torch.where(turns % 2 == 1, x.transpose(-2, -1), x)
        x = torch.where((turns == 1) | (turns == 2), x.flip(-2), x)
        return torch.where(turns >= 2, x.flip(-1), x)


# The poster's pipeline, what conf/augment/default.yaml holds; checkpoints from before that file named its steps were
# written with `build_augmentation`'s old keyword arguments, whose defaults were these values.
LEGACY_AUGMENT_DEFAULTS: dict[str, bool | float] = {"rot90": True, "rotation_degrees": 10.0, "hflip": 0.5, "vflip": 0.5,
                                                    "brightness": 0.1, "contrast": 0.1, "p_lighting": 0.5}
# The batch every step is tried on at start-up: two samples, so per-sample draws are exercised; large enough for the
# usual kernels and windows.
PROBE_SHAPE = (2, 4, 64, 64)


def is_legacy_augment(augment: object) -> bool:
    """True for the keyword arguments of the old `build_augmentation` (rot90, rotation_degrees, ...): a mapping of
    known keys to numbers, where the current form maps step names to nodes."""
    return (isinstance(augment, Mapping) and bool(augment) and set(augment) <= set(LEGACY_AUGMENT_DEFAULTS)
            and all(isinstance(value, (bool, int, float)) for value in augment.values()))


def legacy_augment_steps(old: Mapping[str, bool | float]) -> dict[str, dict]:
    """The steps (conf/augment/default.yaml's form) that the old keyword arguments built, in the order they ran."""
    unknown = sorted(set(old) - set(LEGACY_AUGMENT_DEFAULTS))
    if unknown:
        raise ConfigError(f"augment: unknown key(s) {', '.join(unknown)} of the old form (expected "
                          f"{', '.join(LEGACY_AUGMENT_DEFAULTS)})")
    o = {**LEGACY_AUGMENT_DEFAULTS, **old}
    lighting = float(o["p_lighting"])
    candidates: list[tuple[str, bool, dict]] = [
        ("rot90", bool(o["rot90"]), {"_target_": "hpa_lightning.models.augment.RandomRot90"}),
        ("rotation", o["rotation_degrees"] > 0,
         {"_target_": "kornia.augmentation.RandomRotation", "degrees": float(o["rotation_degrees"]), "p": 0.5}),
        ("hflip", o["hflip"] > 0, {"_target_": "kornia.augmentation.RandomHorizontalFlip", "p": float(o["hflip"])}),
        ("vflip", o["vflip"] > 0, {"_target_": "kornia.augmentation.RandomVerticalFlip", "p": float(o["vflip"])}),
        ("brightness", o["brightness"] > 0,
         {"_target_": "kornia.augmentation.RandomBrightness",
          "brightness": [1.0 - float(o["brightness"]), 1.0 + float(o["brightness"])], "p": lighting}),
        ("contrast", o["contrast"] > 0,
         {"_target_": "kornia.augmentation.RandomContrast",
          "contrast": [1.0 - float(o["contrast"]), 1.0 + float(o["contrast"])], "p": lighting}),
    ]
    return {name: node for name, wanted, node in candidates if wanted}


def _one_line(err: BaseException) -> str:
    """An exception as one line (kornia's and Hydra's messages span several)."""
    cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ is not None else err
    text = " ".join(str(cause).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


@contextlib.contextmanager
def _always_applied(step: nn.Module) -> Iterator[None]:
    """kornia draws per sample whether to apply a transform (`p`, `p_batch`), and the 0.7 series (which pyproject
    allows) runs `apply_transform` only when some sample is drawn: the probe sets both to 1 so that a transform whose
    arithmetic fails on 4 channels fails every time, not only when the draw happens to pick it."""
    saved = [(m, m.p, m.p_batch) for m in step.modules() if hasattr(m, "p") and hasattr(m, "p_batch")]
    try:
        for m, _, _ in saved:
            m.p, m.p_batch = 1.0, 1.0
        yield
    finally:
        for m, p, p_batch in saved:
            m.p, m.p_batch = p, p_batch


def _probe(step: nn.Module, where: str) -> None:
    """Run `step` once on a small random 4-channel float batch on the CPU, without touching any global random stream
    (Python's, NumPy's, torch's): building the pipeline must not change what training draws."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _always_applied(step):
            x = torch.rand(PROBE_SHAPE)
            try:
                out = step(x)
            except Exception as err:  # noqa: BLE001 - whatever it raises, the step is unusable on RGBY batches
                raise ConfigError(f"{where} cannot take a {'x'.join(map(str, PROBE_SHAPE))} float batch of the 4 "
                                  f"channels (R, G, B, Y): {_one_line(err)}; remove the step or use a transform that "
                                  f"works on any number of channels") from None
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    # the spatial size may change (a resize to the training size), the batch and the four channels may not
    if not isinstance(out, Tensor) or not out.is_floating_point() or tuple(out.shape[:2]) != PROBE_SHAPE[:2]:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"{where} must return the float (batch, 4, H, W) batch it is given: got {got} for "
                          f"{PROBE_SHAPE}")


def build_step(node: object, key: str) -> nn.Module:
    """One augmentation step from its Hydra node, refused in one line naming `key` and its `_target_` when it does not
    import, does not build, is not an `nn.Module`, or does not take a 4-channel float batch."""
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ConfigError(f"{key}: expected a node with a _target_ (an nn.Module class such as "
                          f"kornia.augmentation.RandomHorizontalFlip), got {node!r}")
    target = node["_target_"]
    where = f"{key} ({target})"
    if not isinstance(target, str):
        raise ConfigError(f"{key}: _target_ must be a dotted name, got {target!r}")
    from hydra._internal.utils import _locate  # Hydra's own import-by-dotted-name, without its error log

    try:
        _locate(target)
    except Exception as err:  # noqa: BLE001 - a failed import of the user's module can raise anything
        raise ConfigError(f"{where}: _target_ does not import: {_one_line(err)}") from None
    try:
        # plain lists and dicts for the arguments: kornia checks for tuple/list, not OmegaConf's ListConfig
        step = instantiate(node, _convert_="all")
    except Exception as err:  # noqa: BLE001 - the constructor's own error, reported on one line
        raise ConfigError(f"{where}: could not be built: {_one_line(err)}") from None
    if not isinstance(step, nn.Module):
        raise ConfigError(f"{where}: an augmentation must be a torch.nn.Module taking and returning a (B, 4, H, W) "
                          f"batch, got {type(step).__name__}")
    _probe(step, where)
    return step


class Augmentation(nn.Sequential):
    """The configured steps, applied in order. The steps are defined by the configuration (saved as the module's
    hyperparameters), not by the checkpoint: their buffers (kornia keeps its sampling ranges in buffers) stay out of
    the state dict, and any found there on loading are ignored, so checkpoints written before or after a change of
    the pipeline's layout load into it."""

    def __init__(self, steps: OrderedDict[str, nn.Module] | None = None):
        super().__init__(steps or OrderedDict())
        for module in self.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, buffer, persistent=False)
        self.register_load_state_dict_pre_hook(_ignore_saved_entries)


def _ignore_saved_entries(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    for name in [name for name in state_dict if name.startswith(prefix)]:
        del state_dict[name]


def build_augmentation(steps: Mapping[str, Mapping | None] | Sequence[Mapping] | None) -> Augmentation:
    """The device-side augmentation from the `augment` config: a mapping of step names to Hydra nodes
    (conf/augment/default.yaml; a null node is a step switched off) or a list of nodes, applied in the order given.
    Each step is built and tried on a 4-channel batch now, so a bad one is refused (`ConfigError`, one line naming its
    key and `_target_`) when the module is built, before the first training step."""
    if steps is None:
        return Augmentation()
    if isinstance(steps, Mapping):
        named = [(str(name), node, f"augment.{name}") for name, node in steps.items() if node is not None]
    elif isinstance(steps, Sequence) and not isinstance(steps, str):
        named = [(str(i), node, f"augment[{i}]") for i, node in enumerate(steps)]
    else:
        raise ConfigError(f"augment: expected a mapping of named steps or a list of steps, got {steps!r}")
    return Augmentation(OrderedDict((name, build_step(node, key)) for name, node, key in named))


EVAL_CROPS = ("full", "center")


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central `size` x `size` window of (..., H, W) images (the upper-left one when H - size is odd)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def check_crop(crop: dict | None, image_size: int | None = None) -> tuple[int | None, str]:
    """(size, eval) of a `crop` node, one line naming the key when wrong (`ValueError`)."""
    crop = crop or {}
    size, evaluation = crop.get("size"), crop.get("eval", "full")
    if evaluation not in EVAL_CROPS:
        raise ValueError(f"crop.eval={evaluation!r}: expected one of {', '.join(EVAL_CROPS)}")
    if size is None:
        return None, evaluation
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"crop.size={size!r}: expected a whole number of pixels >= 8, or null")
    if image_size is not None and size > image_size:
        raise ValueError(f"crop.size={size} is larger than the packed images (data.image_size={image_size}): pack "
                         f"at the higher resolution and crop below it")
    return size, evaluation


class Crop(nn.Module):
    """Crops from a higher resolution: in training one random `size` window per sample (kornia's RandomCrop, the
    same window for the four channels), in evaluation the full image (`eval: full`; global pooling takes any size)
    or the central window (`eval: center`). No `size`: the image as it is."""

    def __init__(self, size: int | None = None, eval: str = "full"):  # noqa: A002 - the config key's name
        super().__init__()
        self.size, self.eval_mode = check_crop({"size": size, "eval": eval})
        self.random = K.RandomCrop((self.size, self.size)) if self.size else None

    def forward(self, x: Tensor, train: bool) -> Tensor:
        if self.size is None:
            return x
        if min(x.shape[-2:]) < self.size:
            raise ValueError(f"crop.size={self.size} is larger than the images ({x.shape[-2]}x{x.shape[-1]})")
        if train:
            return self.random(x)
        return center_crop(x, self.size) if self.eval_mode == "center" else x


class DeviceTransform(nn.Module):
    """The whole device-side transform: to float in [0, 1], crop (random when `train`), augment when `train`,
    standardise."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: Mapping | Sequence | None = None,
                 crop: dict | None = None):
        super().__init__()
        self.standardize = Standardize(mean, std)
        if is_legacy_augment(augment):  # a checkpoint written before the steps were named in conf/augment/
            augment = legacy_augment_steps(augment)
        self.augment = build_augmentation(augment)
        self.crop = Crop(**(crop or {}))

    def forward(self, x: Tensor, train: bool) -> Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        x = self.crop(x, train)
        if train:
            x = self.augment(x)
        return self.standardize(x)
