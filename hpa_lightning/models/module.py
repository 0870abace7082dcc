"""LightningModule: device-side transform, 4-channel timm backbone, loss, grouped optimizer, epoch-level metrics."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import get_object, instantiate
from torch import Tensor, nn

from hpa_lightning.checkpoints import safe_torch_load  # the one reader of checkpoint files
from hpa_lightning.classes import CLASS_NAMES
from hpa_lightning.errors import ConfigError, NonFiniteLossError
from hpa_lightning.models.augment import DeviceTransform
from hpa_lightning.models.epoch_metrics import EpochOutputs
from hpa_lightning.models.net import is_pretrained
from hpa_lightning.models.param_groups import head_parameter_names, parameter_groups
from hpa_lightning.targets import CREATE_MODEL, check_targets, trusted_targets

# Keys that nodes of checkpoints written before the nodes became constructor arguments carry beside them: a display
# `name` in the loss and scheduler, the module's and the trainer's switches in the model node.
_OLD_DISPLAY_KEY = "name"
_OLD_MODEL_SWITCHES = ("channels_last", "compile", "sync_batchnorm")
# a checkpoint's record of a non-finite training loss not yet reported (saved mid-epoch, between two checks)
NONFINITE_KEY = "hpa_nonfinite_loss_unreported"


def current_nodes(model: dict, loss: dict, scheduler: dict | None) -> tuple[dict, dict, dict | None, dict]:
    """Nodes of any checkpoint of this project as constructor arguments: the old keys taken out (the model's
    switches returned apart, {key: value}), the model node given the factory it always meant when it had none."""
    model = {"_target_": CREATE_MODEL, **model}
    switches = {key: model.pop(key) for key in _OLD_MODEL_SWITCHES if key in model}
    return model, _without_display_name(loss), _without_display_name(scheduler), switches


def _without_display_name(node: dict | None) -> dict | None:
    """The node without the old display `name` when its callable takes no `name` (a loss of one's own may)."""
    if not node or _OLD_DISPLAY_KEY not in node:
        return node
    try:
        parameters = inspect.signature(get_object(str(node.get("_target_")))).parameters
    except Exception:  # noqa: BLE001 - building the node reports what is wrong with its target
        return node
    takes_name = _OLD_DISPLAY_KEY in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return node if takes_name else {k: v for k, v in node.items() if k != _OLD_DISPLAY_KEY}


def network_from_node(model: dict, num_classes: int) -> nn.Module:
    """The network of a model node: its `_target_` (timm through `create_model`, or the user's own factory) called
    with the node's arguments and `num_classes`; it must return a timm-style `nn.Module`."""
    net = instantiate(model, num_classes=num_classes)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model._target_={model.get('_target_')}: returned {type(net).__name__}, expected a "
                          f"torch.nn.Module (a timm model: forward_features, forward_head, get_classifier)")
    return net


class HPAModule(L.LightningModule):
    """All constructor arguments are plain containers (saved as hyperparameters; safe for `weights_only` loading).

    The nodes are built as written: the user's own configuration is trusted. What is read back from a checkpoint is
    not: `load_from_checkpoint` checks every `_target_` first (hpa_lightning.targets).

    Args:
        model: Hydra node of the network factory (`_target_: hpa_lightning.models.net.create_model`, name,
            pretrained, drop_rate, global_pool; or the user's own factory), called with `num_classes`.
        loss: Hydra node of the loss (`_target_` and its arguments), called as `loss(logits, targets)`.
        optimizer: Hydra node of the optimizer, `_partial_`; its `lr` is the head's LR, `weight_decay` its decay.
        scheduler: Hydra node of a schedule, `_partial_`, called with the optimizer (plus `total_steps` and
            `steps_per_epoch` when it takes them, as hpa_lightning.models.schedulers do), or None.
        scheduler_interval: `step` or `epoch`: how often Lightning steps the schedule.
        lr_ratios: LR of each depth group (early body, late body, head) relative to `optimizer.lr`.
        layer_decay: layer-wise LR decay instead of the depth groups (each layer's LR the next one's times it), or
            None.
        augment: the device-side augmentation steps (`hpa_lightning.models.augment`), or None for no augmentation.
        crop: {"size": random training crops of this size, "eval": "full" | "center"} (`models.augment.Crop`), or
            None: the images as packed.
        mean, std: per-channel train statistics in [0, 1] units; taken from the DataModule when it has them.
        channels_last: NHWC memory layout for the network and its inputs.
        compile: `torch.compile` the network in place.
    """

    def __init__(self, model: dict, loss: dict, optimizer: dict, scheduler: dict | None = None,
                 lr_ratios: Sequence[float] = (1 / 9, 1 / 3, 1.0), layer_decay: float | None = None,
                 augment: dict | list | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 class_names: Sequence[str] = CLASS_NAMES, crop: dict | None = None,
                 scheduler_interval: str = "step", channels_last: bool = False, compile: bool = False):  # noqa: A002
        super().__init__()
        # checkpoints written before the nodes were constructor arguments: saved again in today's shape
        model, loss, scheduler, switches = current_nodes(model, loss, scheduler)
        channels_last = bool(switches.get("channels_last", channels_last))
        compile = bool(switches.get("compile", compile))  # noqa: A001
        if scheduler_interval not in ("step", "epoch"):
            raise ConfigError(f"scheduler_interval={scheduler_interval!r}: expected step or epoch")
        self.save_hyperparameters()
        self.net = network_from_node(model, len(class_names))
        self.pretrained_loaded = is_pretrained(model.get("pretrained"))  # the factory raises when it cannot load them
        # everything forward_head runs (classifier, head norm, pre-logits): the frozen stage's and the last LR group
        self.head_names = head_parameter_names(self.net)
        self.channels_last = channels_last
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.compile_net = compile
        self.criterion = instantiate(loss)
        self.transform = DeviceTransform(mean or [0.0] * 4, std or [1.0] * 4, augment, crop)
        self._stats_given = mean is not None
        self.body_frozen = False  # set by `FreezeBackbone` during the poster's frozen first stage
        self._nonfinite_seen: Tensor | None = None  # on the device: a training loss since the last check was not finite
        # children, so that Lightning moves their states to the module's device; not persistent, so not in checkpoints
        self.epoch_outputs = nn.ModuleDict({stage: EpochOutputs(len(class_names)) for stage in ("val", "test")})
        self.epoch_results: dict[str, dict[str, np.ndarray]] = {}

    # ---- data on the device -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        # nn.Module.compile() compiles in place, so checkpoints keep the plain `net.` keys that inference loads.
        if self.compile_net and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not self._stats_given and datamodule is not None and hasattr(datamodule, "stats"):
            mean, std = datamodule.stats
            self.transform.standardize.mean.copy_(torch.tensor(mean).view(1, -1, 1, 1))
            self.transform.standardize.std.copy_(torch.tensor(std).view(1, -1, 1, 1))
            self.hparams.mean, self.hparams.std = list(mean), list(std)  # stored with the checkpoint for inference
            self._stats_given = True

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        train = self.trainer is not None and self.trainer.training
        image = self.transform(batch["image"], train=train)
        batch["image"] = image.contiguous(memory_format=torch.channels_last) if self.channels_last else image
        return batch

    def forward(self, x: Tensor) -> Tensor:
        if self.body_frozen:
            # the body runs without autograd: no gradients, no optimizer step, and no backward pass through it
            with torch.no_grad():
                features = self.net.forward_features(x)
            return self.net.forward_head(features)
        return self.net(x)

    # ---- steps --------------------------------------------------------------------------------------------------
    # A GPU runs ahead of the Python that queues its kernels only while nothing reads a value back: every `.item()`,
    # `if tensor:` or progress-bar step metric makes the host wait for the whole queue. So a step reads nothing: the
    # non-finite check is read at the trainer's logging steps, when Lightning reads the logged values anyway, and at
    # the epoch's end (tests/training/test_host_reads.py counts the reads).
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.criterion(self(batch["image"]), batch["target"])
        finite = torch.isfinite(loss.detach())
        self._nonfinite_seen = finite.logical_not() if self._nonfinite_seen is None else (
            self._nonfinite_seen | finite.logical_not())
        batch_size = len(batch["image"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=batch_size)
        # Lightning turns every step value shown on the progress bar into a number at every step (a read), even one
        # logged only at some steps; an epoch value it reads at the epoch's end only
        self.log("loss", loss, on_step=False, on_epoch=True, prog_bar=True, logger=False, batch_size=batch_size)
        if self.global_step % max(1, int(self.trainer.log_every_n_steps or 1)) == 0:
            self.check_finite_loss()
        return loss

    def check_finite_loss(self) -> None:
        """Raise `NonFiniteLossError` when a training loss since the last check was NaN or infinite (one read)."""
        seen, self._nonfinite_seen = self._nonfinite_seen, None
        if seen is not None and bool(seen):
            raise NonFiniteLossError(f"non-finite training loss at epoch {self.current_epoch}, by step "
                                     f"{self.global_step}; lower optimizer.lr or check the data")

    def on_train_epoch_end(self) -> None:
        self.check_finite_loss()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a checkpoint between two checks (mid-epoch, on SIGTERM) keeps what the next check has to report
        if self._nonfinite_seen is not None:
            checkpoint[NONFINITE_KEY] = bool(self._nonfinite_seen)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        seen = checkpoint.get(NONFINITE_KEY)
        self._nonfinite_seen = None if seen is None else torch.tensor(bool(seen), device=self.device)

    def _eval_step(self, batch: dict, stage: str) -> None:
        logits = self(batch["image"])
        loss = self.criterion(logits, batch["target"])
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(batch["image"]))
        self.epoch_outputs[stage].update(torch.sigmoid(logits.float()), batch["target"], batch["index"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # ---- epoch metrics ------------------------------------------------------------------------------------------
    def _epoch_end(self, stage: str) -> None:
        outputs = self.epoch_outputs[stage]
        if self.trainer.sanity_checking:  # every rank sanity-checks, so none waits in a gather the others skip
            outputs.reset()
            return
        result = outputs.compute()  # gathers over the ranks: each of them gets here
        outputs.reset()
        if result["summary"] is None:
            return
        self.epoch_results[stage] = result["outputs"]
        summary = result["summary"]
        # every rank computed the same value from the gathered outputs, so the sync's mean changes nothing; it is there
        # so that callbacks monitoring these metrics see them on every rank without Lightning's DDP warning
        self.log(f"{stage}/macro_f1", float(summary["macro_f1"]), prog_bar=True, sync_dist=True)
        for key, name in (("roc_auc", "roc_auc"), ("mean_average_precision", "mAP")):
            value = float("nan") if summary[key] is None else float(summary[key])
            self.log(f"{stage}/{name}", value, prog_bar=stage == "val" and key == "roc_auc", sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # ---- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt_cfg = dict(self.hparams.optimizer)
        layer_decay = self.hparams.get("layer_decay")
        groups = parameter_groups(self.net, lr=float(opt_cfg["lr"]), lr_ratios=self.hparams.lr_ratios,
                                  weight_decay=float(opt_cfg.get("weight_decay", 0.0)), head=self.head_names,
                                  layer_decay=None if layer_decay is None else float(layer_decay))
        optimizer = instantiate(opt_cfg)(groups)
        if not self.hparams.scheduler:
            return optimizer
        schedule = instantiate(self.hparams.scheduler)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        run_length = {"total_steps": total_steps, "steps_per_epoch": max(1, total_steps // max_epochs)}
        # the project's schedules are told the run's length; torch's lr_scheduler classes take their own arguments
        taken = inspect.signature(schedule).parameters
        scheduler = schedule(optimizer, **{key: value for key, value in run_length.items() if key in taken})
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             trust: Sequence[str] = (), **kwargs):
        """Lightning's loader, after checks: the file must load with `weights_only=True` and name only allowlisted or
        trusted (`trust`, or HPA_TRUST_TARGETS) `_target_`s, since Lightning instantiates whatever it holds; the
        network is built without fetching pretrained weights (the checkpoint's own replace them). `kwargs` are the
        caller's own and are not checked."""
        if hparams_file is not None:
            raise ValueError(f"{hparams_file}: hparams_file is not supported; checkpoints carry their hyperparameters")
        checkpoint = safe_torch_load(Path(checkpoint_path))
        hparams = checkpoint.get("hyper_parameters", {})
        check_targets(hparams, str(checkpoint_path), "hyper_parameters", trusted_targets(trust))
        if isinstance(hparams.get("model"), dict) and "model" not in kwargs:
            kwargs["model"] = {**hparams["model"], "pretrained": False}
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, strict=strict,
                                            weights_only=True, **kwargs)
