"""The callables a checkpoint or a saved run configuration may name, and the check applied to every `_target_`.

Only files that may come from someone else are checked: a checkpoint being loaded (`HPAModule.load_from_checkpoint`,
a custom backbone of a checkpoint being predicted from) and the saved configuration of a run being
resumed or rerun. The user's own configuration (command line, `conf/`, their config dirs) is built as written:
whoever types the command can run code anyway. A file that names the user's own class is loaded when they say so,
by its exact name: `trust=mylosses.AsymmetricLoss` on the command, or `HPA_TRUST_TARGETS=mylosses.AsymmetricLoss`
(comma-separated) in the environment.

Hydra builds objects from `_target_` strings by importing modules and then walking attributes, so a name that merely
starts with a trusted prefix proves nothing: `torch.nn.functional.torch.load` is `torch.load`, and
`hpa_lightning.data.store.Path.write_text` is `pathlib.Path.write_text`. A `_target_` from a file is therefore
resolved and the resolved object compared, by identity, with this explicit list of what the project's configs name.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Iterator

from hpa_lightning.errors import UnsafeTargetError

# Exactly what conf/ names (tests/test_targets.py keeps the two in step). Code of your own is not added here: a file
# that names it loads with `trust=` (see the module docstring).
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
    "torch.optim.lr_scheduler.MultiStepLR",
    "hpa_lightning.models.net.create_model",
    # the device-side augmentation's steps (conf/augment/default.yaml), stored in every checkpoint's hyperparameters
    "hpa_lightning.models.augment.RandomRot90",
    "kornia.augmentation.RandomRotation",
    "kornia.augmentation.RandomHorizontalFlip",
    "kornia.augmentation.RandomVerticalFlip",
    "kornia.augmentation.RandomBrightness",
    "kornia.augmentation.RandomContrast",
    # the rest of a run's configuration: data, trainer, callbacks, loggers, Hydra callbacks, baseline estimators
    "hpa_lightning.data.cell_store.CellDataModule",
    "hpa_lightning.data.datamodule.HPADataModule",
    "lightning.pytorch.Trainer",
    "hpa_lightning.training.checkpoint_io.AtomicCheckpointIO",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "hpa_lightning.training.callbacks.FreezeBackbone",
    "hpa_lightning.training.callbacks.LRTrace",
    "hpa_lightning.training.callbacks.RNGState",
    "hpa_lightning.training.mid_epoch.MidEpochState",
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
    "hpa_lightning.reporting.wandb_sweep_end.SweepDashboard",
    "sklearn.ensemble.RandomForestClassifier",
    "sklearn.linear_model.LogisticRegression",
)
# Packages whose import has no side effects worth fearing: only names under them are resolved at all.
_IMPORTABLE_ROOTS = ("hpa_lightning", "torch", "lightning", "sklearn")
# Names the user trusts on purpose (comma-separated), beside the `trust=` argument of the loading commands.
ENV_TRUST = "HPA_TRUST_TARGETS"
# What a `_target_` from a file may look like at all: an interpolation (`${oc.env:X}`), which Hydra would resolve only
# when building, to whatever the environment or another key says then, is refused before any comparison or trust.
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


CREATE_MODEL = "hpa_lightning.models.net.create_model"  # the project's timm factory, what model nodes mean without one


def own_factory(model_node: dict) -> dict | None:
    """The model node when it names a factory other than the project's timm one (checkpoints from before the node had
    a `_target_` mean the project's), else None: the network is rebuilt from its timm name alone."""
    target = model_node.get("_target_", CREATE_MODEL)
    return None if target == CREATE_MODEL else dict(model_node)


def trusted_targets(extra: str | Iterable[str] = ()) -> tuple[str, ...]:
    """The names trusted for this process: `HPA_TRUST_TARGETS` plus `extra` (a comma-separated string or names)."""
    names = [*os.environ.get(ENV_TRUST, "").split(","), *(extra.split(",") if isinstance(extra, str) else extra)]
    return tuple(dict.fromkeys(name.strip() for name in names if name.strip()))


def trust_in_this_process(names: str) -> None:
    """Add `names` (comma-separated, the `trust=` argument of the loading commands) to this process's trusted names,
    and so to those of the jobs it starts."""
    if names:
        os.environ[ENV_TRUST] = ",".join(trusted_targets(names))


@functools.cache
def _objects(names: tuple[str, ...]) -> dict[int, str]:
    """id(object) -> name for each name; a trusted name that does not resolve is one line naming it."""
    from hydra._internal.utils import _locate

    objects = {}
    for name in names:
        try:
            objects[id(_locate(name))] = name
        except Exception as err:  # noqa: BLE001 - import errors of the user's module come in every type
            cause = err.__cause__ or err  # Hydra wraps the import's own error in a three-line ImportError
            raise UnsafeTargetError(f"trust={name}: cannot import it ({type(cause).__name__}: "
                                    f"{str(cause).splitlines()[0] if str(cause) else 'no message'})") from None
    return objects


def resolve_allowed(target: object, where: str, trust: Iterable[str] = ()) -> str:
    """The allowlisted (or trusted) name `target` stands for; `UnsafeTargetError` naming `where` for anything else,
    and for anything but a dotted name (an interpolation, even a trusted one).

    A name is compared by the object it resolves to, never by prefix; only names under the importable roots or
    under a trusted name's own module are resolved at all (the file chooses the string, not what gets imported)."""
    if not isinstance(target, str):
        raise UnsafeTargetError(f"{where}: _target_ must be a dotted name, got {type(target).__name__}")
    if not _DOTTED.fullmatch(target):
        raise UnsafeTargetError(f"{where}: _target_ {target!r} is not a dotted name; refusing to build it (a file's "
                                "_target_ is never resolved)")
    trust = tuple(trust)
    if target in ALLOWED_TARGETS or target in trust:
        return target
    roots = set(_IMPORTABLE_ROOTS) | {name.partition(".")[0] for name in trust}
    if target.partition(".")[0] in roots:
        from hydra._internal.utils import _locate

        objects = {**_objects(ALLOWED_TARGETS), **_objects(trust)}
        try:
            name = objects.get(id(_locate(target)))
        except Exception:  # noqa: BLE001 - any failure to resolve is a refusal
            name = None
        if name is not None:
            return name  # another path to an allowed callable, e.g. torch.optim.sgd.SGD
    raise UnsafeTargetError(f"{where}: _target_ {target!r} is not one of the callables hpa_lightning builds; "
                            f"refusing to build it (if you trust this file, pass trust={target} or set "
                            f"{ENV_TRUST}={target})")


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


def check_targets(node: object, source: str, key: str = "", trust: Iterable[str] = ()) -> None:
    """Refuse (one line naming `source` and the keys) a tree that names anything outside the allowlist and `trust`.

    Every refused `_target_` is named at once, with the `trust=` value that would accept the dotted names among them
    (a saved run of the user's own code often names several: loss, optimizer, callbacks)."""
    trust = tuple(trust)
    refused: list[tuple[str, object, UnsafeTargetError]] = []
    for path, target in iter_targets(node, key):
        try:
            resolve_allowed(target, f"{source}: {path}", trust)
        except UnsafeTargetError as err:
            refused.append((path, target, err))
    if len(refused) == 1:
        raise refused[0][2]
    if refused:
        names = ",".join(dict.fromkeys(t for _, t, _ in refused if isinstance(t, str) and _DOTTED.fullmatch(t)))
        keys = ", ".join(f"{path} {target!r}" for path, target, _ in refused)
        hint = f" (if you trust this file, pass trust={names} or set {ENV_TRUST}={names})" if names else ""
        raise UnsafeTargetError(f"{source}: {len(refused)} _target_s are not among the callables hpa_lightning "
                                f"builds: {keys}; refusing to build them{hint}")
