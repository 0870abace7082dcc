"""LightningModule: device-side transform, 4-channel timm backbone, loss, grouped optimizer, epoch-level metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from torch import Tensor

from hpa_lightning import metrics
from hpa_lightning.checkpoints import safe_torch_load  # the one reader of checkpoint files
from hpa_lightning.classes import CLASS_NAMES, NUM_CLASSES
from hpa_lightning.errors import NonFiniteLossError
from hpa_lightning.models.augment import DeviceTransform
from hpa_lightning.models.net import parameter_groups
from hpa_lightning.targets import canonical_targets, check_targets


def without_name(node: dict) -> dict:
    """Config nodes carry a display `name` (for results and reports) that their `_target_` does not take."""
    return {k: v for k, v in node.items() if k != "name"}


class HPAModule(L.LightningModule):
    """All constructor arguments are plain containers (saved as hyperparameters; safe for `weights_only` loading).

    Args:
        model: Hydra node of the network (`_target_: hpa_lightning.models.net.create_model`, name, pretrained,
            drop_rate; checkpoints from before the node had a `_target_` mean that same factory) plus `channels_last`,
            `compile` and `sync_batchnorm`, which are the module's and the trainer's.
        loss: Hydra node of the loss (`_target_` ...).
        optimizer: Hydra node of the optimizer, `_partial_`; its `lr` is the head's LR, `weight_decay` its decay.
        scheduler: Hydra node of a `hpa_lightning.models.schedulers` factory, `_partial_`, or None.
        lr_ratios: LR of each depth group (early body, late body, head) relative to `optimizer.lr`.
        augment: kwargs of `hpa_lightning.models.augment.build_augmentation`, or None for no augmentation.
        crop: {"size": random training crops of this size, "eval": "full" | "center"} (`models.augment.Crop`), or
            None: the images as packed.
        mean, std: per-channel train statistics in [0, 1] units; taken from the DataModule when it has them.
    """

    def __init__(self, model: dict, loss: dict, optimizer: dict, scheduler: dict | None = None,
                 lr_ratios: Sequence[float] = (1 / 9, 1 / 3, 1.0), augment: dict | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 class_names: Sequence[str] = CLASS_NAMES, crop: dict | None = None):
        super().__init__()
        # the nodes below are instantiated; from a checkpoint they are data written by someone else, maybe under the
        # names of an older layout (saved again under the current names)
        model, loss, optimizer, scheduler = (canonical_targets(node) for node in (model, loss, optimizer, scheduler))
        check_targets({"model": model, "loss": loss, "optimizer": optimizer, "scheduler": scheduler},
                      "hyperparameters")
        self.save_hyperparameters()
        net_node = {"_target_": "hpa_lightning.models.net.create_model",
                    **{k: v for k, v in model.items() if k not in ("channels_last", "compile", "sync_batchnorm")}}
        self.net, self.pretrained_loaded = instantiate(net_node, num_classes=len(class_names))
        self.channels_last = bool(model.get("channels_last", False))
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.compile_net = bool(model.get("compile", False))
        self.criterion = instantiate(without_name(loss))
        self.transform = DeviceTransform(mean or [0.0] * 4, std or [1.0] * 4, augment, crop)
        self._stats_given = mean is not None
        self.body_frozen = False  # set by `FreezeBackbone` during the poster's frozen first stage
        self._outputs: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {"val": [], "test": [], "predict": []}
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
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.criterion(self(batch["image"]), batch["target"])
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, "
                                     f"step {self.global_step}; lower optimizer.lr or check the data")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        logits = self(batch["image"])
        loss = self.criterion(logits, batch["target"])
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(batch["image"]))
        self._outputs[stage].append((torch.sigmoid(logits.float()).detach(), batch["target"].detach(),
                                     batch["index"].detach()))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # ---- epoch metrics ------------------------------------------------------------------------------------------
    def _gather(self, stage: str) -> dict[str, np.ndarray]:
        """All outputs of the epoch from every rank, each store row exactly once (DDP pads with repeats)."""
        outputs = self._outputs[stage]
        self._outputs[stage] = []
        if not outputs:
            empty = np.zeros((0, NUM_CLASSES), dtype=np.float32)
            return {"probs": empty, "targets": empty, "rows": np.zeros(0, dtype=np.int64)}
        probs, targets, rows = (torch.cat(parts) for parts in zip(*outputs, strict=True))
        if self.trainer.world_size > 1:
            probs, targets, rows = (self.all_gather(t).flatten(0, 1) for t in (probs, targets, rows))
        rows_np = rows.cpu().numpy()
        _, first = np.unique(rows_np, return_index=True)
        return {"probs": probs.cpu().numpy()[first], "targets": targets.cpu().numpy()[first], "rows": rows_np[first]}

    def _epoch_end(self, stage: str) -> None:
        result = self._gather(stage)
        if self.trainer.sanity_checking or len(result["rows"]) == 0:
            return
        self.epoch_results[stage] = result
        summary = metrics.summarize(result["targets"], result["probs"])
        roc_auc = float("nan") if summary["roc_auc"] is None else float(summary["roc_auc"])
        # every rank computed the same value from the gathered outputs, so the sync's mean changes nothing; it is there
        # so that callbacks monitoring these metrics see them on every rank without Lightning's DDP warning
        self.log(f"{stage}/macro_f1", float(summary["macro_f1"]), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/roc_auc", roc_auc, prog_bar=stage == "val", sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # ---- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt_cfg = dict(self.hparams.optimizer)
        groups = parameter_groups(self.net, lr=float(opt_cfg["lr"]), lr_ratios=self.hparams.lr_ratios,
                                  weight_decay=float(opt_cfg.get("weight_decay", 0.0)))
        optimizer = instantiate(opt_cfg)(groups)
        if not self.hparams.scheduler:
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps_per_epoch = max(1, total_steps // max_epochs)
        scheduler = instantiate(without_name(self.hparams.scheduler))(optimizer, total_steps=total_steps,
                                                              steps_per_epoch=steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> HPAModule:
        """Load for inference: weights only (no pickled code), only allowlisted `_target_`s, and never re-fetch
        pretrained weights."""
        checkpoint = safe_torch_load(Path(path), map_location)
        hparams = dict(checkpoint["hyper_parameters"])
        check_targets(hparams, str(path), "hyper_parameters")
        hparams["model"] = {**hparams["model"], "pretrained": False}
        module = cls(**hparams)
        module.load_state_dict(checkpoint["state_dict"])
        return module.eval()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's loader, after the same checks as `from_checkpoint`: the file must load with
        `weights_only=True` and name only allowlisted `_target_`s (Lightning itself instantiates whatever it holds)."""
        if hparams_file is not None:
            raise ValueError(f"{hparams_file}: hparams_file is not supported; checkpoints carry their hyperparameters")
        checkpoint = safe_torch_load(Path(checkpoint_path))
        check_targets(checkpoint.get("hyper_parameters", {}), str(checkpoint_path), "hyper_parameters")
        check_targets(kwargs, "load_from_checkpoint arguments")
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, strict=strict,
                                            weights_only=True, **kwargs)
