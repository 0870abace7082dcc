"""The poster's first stage: train only the classifier head for `frozen_epochs`, then unfreeze everything."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class FrozenStageError(RuntimeError):
    """A trainer set-up under which the frozen stage cannot be honoured; one line naming the config key."""


POSTER_FROZEN_EPOCHS = 1
POSTER_LR_RATIOS = (1 / 9, 1 / 3, 1.0)  # early body, late body, head: fastai's lr/9, lr/3, lr
SCRATCH_LR_RATIOS = (1.0, 1.0, 1.0)


def resolve_recipe(frozen_epochs: object, lr_ratios: object, pretrained: bool) -> tuple[int, list[float], list[str]]:
    """`finetune.frozen_epochs` and `finetune.lr_ratios` with `auto` replaced: the poster's values for pretrained
    weights, no freeze and equal LRs from scratch. Returns (frozen_epochs, lr_ratios, the keys that were auto)."""
    auto = []
    if frozen_epochs == "auto":
        frozen_epochs, auto = (POSTER_FROZEN_EPOCHS if pretrained else 0), [*auto, "frozen_epochs"]
    if lr_ratios == "auto":
        lr_ratios, auto = (POSTER_LR_RATIOS if pretrained else SCRATCH_LR_RATIOS), [*auto, "lr_ratios"]
    try:
        frozen, ratios = int(frozen_epochs), [float(r) for r in lr_ratios]
    except (TypeError, ValueError):
        raise FrozenStageError(f"finetune: frozen_epochs={frozen_epochs!r} and lr_ratios={lr_ratios!r} must be "
                               "auto or an integer and a list of numbers") from None
    if frozen < 0 or not ratios or min(ratios) <= 0:
        raise FrozenStageError(f"finetune: frozen_epochs={frozen} must be >= 0 and lr_ratios={ratios} positive")
    return frozen, ratios, auto


def body_modules(model: nn.Module) -> list[nn.Module]:
    head = model.get_classifier()
    return [m for m in model.children() if m is not head]


class FreezeBackbone(L.Callback):
    """Everything but the head is frozen for the first `frozen_epochs` epochs.

    Frozen means: the body's forward pass runs without autograd (`HPAModule.body_frozen`), so its parameters get no
    gradient, and its BatchNorm layers are held in eval mode, so they normalise with their (pretrained) running
    statistics and those statistics do not move. A parameter without a gradient is skipped by the optimizer (no
    momentum, no weight decay) until the body is unfrozen.

    Not Lightning's BaseFinetuning (`requires_grad=False`): DDP registers its gradient hooks for the parameters that
    require grad when it wraps the model, before the first epoch, so parameters unfrozen later were never all-reduced
    and the ranks drifted apart (Lightning issue 20340). Here every parameter requires grad from the start, and DDP
    is told that some take no part in the frozen stage's backward pass (`find_unused_parameters`, set by
    `trainer=ddp` and `trainer=ddp_cpu`).
    """

    def __init__(self, frozen_epochs: int = 1):
        super().__init__()
        self.frozen_epochs = frozen_epochs

    def _frozen(self, epoch: int) -> bool:
        return epoch < self.frozen_epochs

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        if (self.frozen_epochs > 0 and trainer.world_size > 1 and isinstance(strategy, DDPStrategy)
                and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)):
            raise FrozenStageError(
                f"finetune.frozen_epochs={self.frozen_epochs} under DDP needs "
                "trainer.strategy=ddp_find_unused_parameters_true (the frozen body takes no part in the backward "
                "pass); or set finetune.frozen_epochs=0")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # set from the epoch, not toggled once: a run resumed after the unfreeze epoch comes back unfrozen
        pl_module.body_frozen = self._frozen(trainer.current_epoch)
        if not pl_module.body_frozen:
            # Lightning keeps each submodule's mode across epochs: the BatchNorm layers held in eval mode while
            # frozen resume updating their statistics
            for module in body_modules(pl_module.net):
                module.train()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # Lightning puts the whole model in train mode at every epoch start; frozen BatchNorm stays in eval mode
        if self._frozen(trainer.current_epoch):
            for module in body_modules(pl_module.net):
                for layer in module.modules():
                    if isinstance(layer, _BatchNorm) and layer.training:
                        layer.eval()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.body_frozen = False
