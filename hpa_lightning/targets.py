"""The callables a checkpoint or a saved run configuration may name, and the check applied to every `_target_`.

Hydra builds objects from `_target_` strings by importing modules and then walking attributes, so a name that merely
starts with a trusted prefix proves nothing: `torch.nn.functional.torch.load` is `torch.load`, and
`hpa_lightning.data.store.Path.write_text` is `pathlib.Path.write_text`. A `_target_` from a file is therefore
resolved and the resolved object compared, by identity, with this explicit list of what the project's configs name.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from hpa_lightning.errors import UnsafeTargetError

# Exactly what conf/ names (tests/test_targets.py keeps the two in step). To make a new loss, optimizer or schedule
# loadable from checkpoints, add its dotted name here.
ALLOWED_TARGETS: tuple[str, ...] = (
    # losses, optimizers and schedules: stored in every checkpoint's hyperparameters
    "hpa_lightning.models.losses.FocalLoss",
    "hpa_lightning.models.losses.bce_loss",
    "hpa_lightning.models.losses.LovaszHingeLoss",
    "hpa_lightning.models.losses.WeightedLossSum",
    "torch.optim.SGD",
    "torch.optim.AdamW",
    "torch.optim.Adam",
    "hpa_lightning.models.schedulers.sgdr",
    "hpa_lightning.models.schedulers.cosine",
    "hpa_lightning.models.schedulers.constant",
    "hpa_lightning.models.net.create_model",
    # the rest of a run's configuration: data, trainer, callbacks, loggers, Hydra callbacks, baseline estimators
    "hpa_lightning.data.datamodule.HPADataModule",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "hpa_lightning.training.callbacks.FreezeBackbone",
    "hpa_lightning.training.callbacks.LRTrace",
    "hpa_lightning.training.callbacks.RNGState",
    "hpa_lightning.training.callbacks.FiniteCheckpointGuard",
    "hpa_lightning.training.callbacks.InterruptCheckpoint",
    "hpa_lightning.training.callbacks.EMAWeightAverage",
    "hpa_lightning.training.callbacks.SWAWeightAverage",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.WandbLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.MLFlowLogger",
    "hpa_lightning.runs.hydra_callbacks.ControllerHydraConfig",
    "hpa_lightning.runs.hydra_callbacks.ReportPendingJobs",
    "sklearn.ensemble.RandomForestClassifier",
    "sklearn.linear_model.LogisticRegression",
)
# The names under which checkpoints written before the package was laid out in subpackages store their model, loss
# and schedule: read as the names they became, so those checkpoints keep loading (and are saved again under the new).
RENAMED_TARGETS: dict[str, str] = {
    "hpa_lightning.losses.FocalLoss": "hpa_lightning.models.losses.FocalLoss",
    "hpa_lightning.losses.bce_loss": "hpa_lightning.models.losses.bce_loss",
    "hpa_lightning.schedulers.sgdr": "hpa_lightning.models.schedulers.sgdr",
    "hpa_lightning.schedulers.cosine": "hpa_lightning.models.schedulers.cosine",
    "hpa_lightning.schedulers.constant": "hpa_lightning.models.schedulers.constant",
    "hpa_lightning.model.create_model": "hpa_lightning.models.net.create_model",
}
# Packages whose import has no side effects worth fearing: only names under them are resolved at all.
_IMPORTABLE_ROOTS = ("hpa_lightning", "torch", "lightning", "sklearn")




@functools.cache
def _allowed_objects() -> dict[int, str]:
    from hydra._internal.utils import _locate

    return {id(_locate(name)): name for name in ALLOWED_TARGETS}


def resolve_allowed(target: object, where: str) -> str:
    """The allowlisted name `target` stands for; `UnsafeTargetError` naming `where` for anything else."""
    if not isinstance(target, str):
        raise UnsafeTargetError(f"{where}: _target_ must be a dotted name, got {type(target).__name__}")
    target = RENAMED_TARGETS.get(target, target)
    if target in ALLOWED_TARGETS:
        return target
    if target.split(".", 1)[0] in _IMPORTABLE_ROOTS:
        from hydra._internal.utils import _locate

        try:
            resolved = _locate(target)
        except Exception:  # noqa: BLE001 - any failure to resolve is a refusal
            resolved = None
        name = _allowed_objects().get(id(resolved)) if resolved is not None else None
        if name is not None:
            return name  # another path to an allowed callable, e.g. torch.optim.sgd.SGD
    raise UnsafeTargetError(f"{where}: _target_ {target!r} is not one of the callables hpa_lightning builds "
                            f"(see hpa_lightning.targets.ALLOWED_TARGETS); refusing to build it")


def iter_targets(node: object, key: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every `_target_` in a tree of dicts and lists (OmegaConf containers included,
    unresolved: an interpolated `_target_` is refused rather than resolved)."""
    from omegaconf import Container, OmegaConf

    if isinstance(node, Container):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        for name, value in node.items():
            path = f"{key}.{name}" if key else str(name)
            if name == "_target_":
                yield path, value
            else:
                yield from iter_targets(value, path)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from iter_targets(value, f"{key}[{i}]")


def canonical_targets(node: object) -> object:
    """A copy of a tree of dicts and lists with every renamed `_target_` (RENAMED_TARGETS) under its current name."""
    if isinstance(node, dict):
        return {key: (RENAMED_TARGETS.get(value, value) if key == "_target_" and isinstance(value, str)
                      else canonical_targets(value)) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(canonical_targets(value) for value in node)
    return node


def check_targets(node: object, source: str, key: str = "") -> None:
    """Refuse (one line naming `source` and the key) a tree that names anything outside the allowlist."""
    for path, target in iter_targets(node, key):
        resolve_allowed(target, f"{source}: {path}")
