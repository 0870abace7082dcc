"""Load a trained model for inference from a run folder, a Lightning checkpoint or an exported model folder.

Whatever the source, the result is an `InferenceModel`: the bare timm network, the standardisation it was trained
with, the training resolution, the class names and the tuned decision thresholds. Nothing here runs code stored in
a file: checkpoints are read with `torch.load(weights_only=True)` only (a file that needs more is refused, never
retried unsafely), exported weights are safetensors, and the network is rebuilt from its timm name alone (the loss,
optimizer and augmentation nodes of a checkpoint, which name Python callables, are never instantiated). A network
built by the user's own factory is rebuilt by it only when its `_target_` is trusted (`trust=` on the command, or
HPA_TRUST_TARGETS): the checkpoint or card may be someone else's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from hpa_lightning.checkpoints import safe_torch_load
from hpa_lightning.classes import CHANNELS
from hpa_lightning.errors import ConfigError, InferenceError
from hpa_lightning.models.augment import Standardize
from hpa_lightning.models.net import build_network
from hpa_lightning.runs import layout
from hpa_lightning.targets import check_targets, own_factory, trusted_targets

CARD_NAME = "card.json"


WEIGHTS_NAME = "model.safetensors"


EXPORT_FORMAT = "hpa_lightning.export/1"
ENSEMBLE_FORMAT = "hpa_lightning.export-ensemble/1"  # member<i>/ single exports + weights and thresholds


@dataclass
class InferenceModel:
    net: nn.Module
    standardize: Standardize
    architecture: str
    image_size: int | None
    class_names: list[str]
    thresholds: np.ndarray  # (C,) float64
    ensure_one: bool
    thresholds_source: str | None
    source: str  # the checkpoint or export folder the weights came from
    extra: dict = field(default_factory=dict)
    global_pool: str | None = None  # timm's global_pool when the run set one (e.g. catavgmax), else the default
    crop: dict | None = None  # {"size": training crop size, "eval": "full" | "center"} when the run trained on crops
    factory: dict | None = None  # the model node of the user's own network factory; None: timm's `architecture`
    # the size a fixed-size architecture (ViT, Swin, ...) was built for, and whether it takes any size at run time;
    # None and False for CNNs and for checkpoints and exports from before these were recorded
    img_size: int | None = None
    dynamic_img_size: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: torch.device | str) -> InferenceModel:
        self.net.to(device)
        self.standardize.to(device)
        return self


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InferenceError(f"{path}: not readable JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InferenceError(f"{path}: expected a JSON object")
    return data


def _build_net(architecture: str, num_classes: int, global_pool: str | None, where: Path, img_size: int | None = None,
               dynamic_img_size: bool = False) -> nn.Module:
    """timm's network as trained: its pooling, and for a fixed-size architecture the size it was built for (with
    what depends on it: Swin's windows, MaxViT's partitions), so the weights fit."""
    try:
        return build_network(architecture, num_classes, in_chans=len(CHANNELS), global_pool=global_pool,
                             img_size=img_size, dynamic_img_size=dynamic_img_size)
    except ConfigError as err:
        raise InferenceError(f"{where}: {err}") from None


def _build_factory_net(factory: dict, num_classes: int, where: Path, key: str) -> nn.Module:
    """The network of the user's own factory named by a checkpoint or card: built only when its `_target_` is
    allowlisted or trusted (the file may be someone else's), and never asked for pretrained weights."""
    from hpa_lightning.models.module import network_from_node

    check_targets(factory, str(where), key, trusted_targets())
    node = {**factory, **({"pretrained": False} if "pretrained" in factory else {})}
    return network_from_node(node, num_classes)


def _size_of(value: object) -> int | None:
    """A recorded network size: a number, or None (`auto` never reaches a checkpoint from a training run)."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _load_weights(net: nn.Module, state: dict[str, Tensor], where: Path) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise InferenceError(f"{where}: weights do not fit the network ({' '.join(lines[1:3])[:300]})") from None


def thresholds_from_file(path: Path | None, class_names: list[str]) -> tuple[np.ndarray, bool, str | None]:
    """Per-class thresholds (class order of the model) and ensure_one from a run's thresholds.json; 0.5 without one."""
    if path is None or not path.is_file():
        return np.full(len(class_names), 0.5), False, None
    data = _read_json(path)
    table = data.get("thresholds")
    if not isinstance(table, dict):
        raise InferenceError(f"{path}: expected {{\"thresholds\": {{class name: threshold}}, ...}}")
    default = float(data.get("default", 0.5))
    unknown = sorted(set(table) - set(class_names))
    if unknown:
        raise InferenceError(f"{path}: unknown class name(s) {', '.join(map(repr, unknown[:3]))}")
    values = np.array([float(table.get(name, default)) for name in class_names], dtype=np.float64)
    if not np.isfinite(values).all():
        raise InferenceError(f"{path}: non-finite threshold")
    return values, bool(data.get("ensure_one", False)), str(path)


def _find_checkpoint(run_dir: Path) -> Path:
    results_path = run_dir / layout.RESULTS
    if results_path.is_file():
        best = _read_json(results_path).get("best_checkpoint")
        if best:
            local = layout.checkpoint(run_dir, Path(best).name)  # a copied/moved run folder: its own copy wins
            if local.is_file():
                return local
            if Path(best).is_file():
                return Path(best)
    for name in (layout.BEST_CHECKPOINT, layout.LAST_CHECKPOINT):
        if layout.checkpoint(run_dir, name).is_file():
            return layout.checkpoint(run_dir, name)
    raise InferenceError(f"{run_dir}: no checkpoint found (expected checkpoints/best.ckpt or results.json)")


def _run_data_setting(run_dir: Path, key: str) -> object:
    """`data.<key>` from the run's config.yaml; None when there is none or it cannot be read."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return None
    import yaml

    try:
        return ((yaml.safe_load(config_path.read_text()) or {}).get("data") or {}).get(key)
    except yaml.YAMLError:
        return None


def _run_sixteen_bit(run_dir: Path) -> str:
    """The run's rule for 16-bit channels (data.sixteen_bit); `divide` for runs from before the option."""
    rule = _run_data_setting(run_dir, "sixteen_bit")
    return rule if isinstance(rule, str) else "divide"


def _run_image_size(run_dir: Path) -> int | None:
    results_path = run_dir / layout.RESULTS
    if results_path.is_file():
        size = _read_json(results_path).get("image_size")
        if size:
            return int(size)
    size = _run_data_setting(run_dir, "image_size")
    return size if isinstance(size, int) else None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> InferenceModel:
    """A Lightning checkpoint of `HPAModule`; run-level facts (image size, thresholds) come from its run folder."""
    checkpoint = safe_torch_load(path, map_location)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise InferenceError(f"{path}: not an HPAModule checkpoint (no state_dict / hyper_parameters)")
    hparams = checkpoint["hyper_parameters"]
    model_cfg = hparams.get("model") or {}
    class_names = [str(c) for c in hparams.get("class_names") or []]
    if not class_names:
        raise InferenceError(f"{path}: checkpoint has no class_names")
    state = checkpoint["state_dict"]
    net_state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    global_pool = model_cfg.get("global_pool")
    factory = own_factory(model_cfg)
    architecture = model_cfg.get("name") or str(model_cfg.get("_target_"))
    img_size, dynamic = _size_of(model_cfg.get("img_size")), model_cfg.get("dynamic_img_size") is True
    if factory is None:
        net = _build_net(architecture, len(class_names), global_pool, path, img_size, dynamic)
    else:
        net = _build_factory_net(factory, len(class_names), path, "hyper_parameters.model")
    _load_weights(net, net_state, path)
    # The buffers the module standardised with (set from the train split); hyperparameters as a fallback.
    mean = state.get("transform.standardize.mean", torch.tensor(hparams.get("mean") or [0.0] * len(CHANNELS)))
    std = state.get("transform.standardize.std", torch.tensor(hparams.get("std") or [1.0] * len(CHANNELS)))
    standardize = Standardize(mean.flatten().tolist(), std.flatten().tolist())
    run_dir = path.parent.parent if path.parent.name == layout.CHECKPOINTS else path.parent
    thresholds, ensure_one, thr_source = thresholds_from_file(run_dir / layout.THRESHOLDS, class_names)
    return InferenceModel(net=net.eval(), standardize=standardize, architecture=architecture, factory=factory,
                          global_pool=global_pool, crop=hparams.get("crop"), image_size=_run_image_size(run_dir),
                          img_size=img_size if factory is None else None, dynamic_img_size=dynamic,
                          class_names=class_names,
                          thresholds=thresholds,
                          ensure_one=ensure_one, thresholds_source=thr_source, source=str(path),
                          extra={"threshold_default": 0.5, "run_dir": str(run_dir),
                                 "sixteen_bit": _run_sixteen_bit(run_dir)})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_export(folder: Path, map_location: str | torch.device = "cpu") -> InferenceModel:
    """An exported model folder (`card.json` + `model.safetensors`): no training code or config needed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card_path = folder / CARD_NAME
    card = _read_json(card_path)
    if card.get("format") == ENSEMBLE_FORMAT:
        raise InferenceError(f"{folder}: an exported ensemble; predict takes it whole (ckpt={folder}), or name one "
                             f"of its member folders")
    if card.get("format") != EXPORT_FORMAT:
        raise InferenceError(f"{card_path}: format {card.get('format')!r}, expected {EXPORT_FORMAT!r}")
    try:
        class_names = [str(c) for c in card["class_names"]]
        channels = list(card["channels"])
        architecture, image_size = card["architecture"], int(card["image_size"])
        mean, std = [float(v) for v in card["mean"]], [float(v) for v in card["std"]]
        table = card["thresholds"]
    except (KeyError, TypeError, ValueError) as err:
        raise InferenceError(f"{card_path}: missing or invalid field ({type(err).__name__}: {err})") from None
    if channels != list(CHANNELS):
        raise InferenceError(f"{card_path}: channel order {channels}, this code reads {list(CHANNELS)}")
    if int(card.get("num_classes", len(class_names))) != len(class_names):
        raise InferenceError(f"{card_path}: num_classes does not match class_names")
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise InferenceError(f"{weights_path}: file not found")
    expected = card.get("weights_sha256")
    if expected and sha256_file(weights_path) != expected:
        raise InferenceError(f"{weights_path}: sha256 differs from {CARD_NAME} (corrupt or replaced weights)")
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise InferenceError(f"{weights_path}: not readable safetensors ({str(err).splitlines()[0]})") from None
    global_pool = card.get("global_pool")
    factory = card.get("factory")
    img_size, dynamic = _size_of(card.get("img_size")), card.get("dynamic_img_size") is True
    if factory is None:
        net = _build_net(architecture, len(class_names), global_pool, card_path, img_size, dynamic)
    else:
        net = _build_factory_net(factory, len(class_names), card_path, "factory")
    _load_weights(net, state, weights_path)
    default = float(card.get("threshold_default", 0.5))
    thresholds = np.array([float(table.get(name, default)) for name in class_names], dtype=np.float64)
    return InferenceModel(net=net.eval(), standardize=Standardize(mean, std), architecture=architecture,
                          factory=factory, global_pool=global_pool, crop=card.get("crop"), image_size=image_size,
                          img_size=img_size, dynamic_img_size=dynamic,
                          class_names=class_names,
                          thresholds=thresholds,
                          ensure_one=bool(card.get("ensure_one", False)),
                          thresholds_source=f"{card_path}" if card.get("thresholds_source") else None,
                          source=str(folder), extra={"threshold_default": default, "card": card,
                                                     "sixteen_bit": str(card.get("sixteen_bit", "divide"))})


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> InferenceModel:
    """A run folder (its best checkpoint), a `.ckpt` file, or an exported model folder."""
    path = Path(path)
    if path.is_dir():
        if (path / CARD_NAME).is_file():
            return load_export(path, map_location)
        return load_checkpoint(_find_checkpoint(path), map_location)
    if path.is_file():
        return load_checkpoint(path, map_location)
    raise InferenceError(f"{path}: not found (expected a run folder, a .ckpt file or an exported model folder)")
