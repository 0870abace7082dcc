"""The poster's first stage: train only the classifier head for `frozen_epochs`, then unfreeze everything."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer


def body_modules(model: nn.Module) -> list[nn.Module]:
    head = model.get_classifier()
    return [m for m in model.children() if m is not head]


class FreezeBackbone(BaseFinetuning):
    """Everything but the head is frozen for the first `frozen_epochs` epochs.

    Frozen BatchNorm layers are kept in eval mode, so they normalise with their (pretrained) running statistics and
    those statistics do not move. All parameters stay in their optimizer groups from the start: a frozen parameter
    has no gradient, so the optimizer skips it (no momentum, no weight decay) until it is unfrozen.
    """

    def __init__(self, frozen_epochs: int = 1):
        super().__init__()
        self.frozen_epochs = frozen_epochs

    def _frozen(self, epoch: int) -> bool:
        return epoch < self.frozen_epochs

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.frozen_epochs > 0:
            self.freeze(body_modules(pl_module.net), train_bn=False)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        # `>=` rather than `==`: a run resumed after the unfreeze epoch must come back unfrozen.
        if not self._frozen(epoch) and self.frozen_epochs > 0:
            self.make_trainable(body_modules(pl_module.net))
            for module in body_modules(pl_module.net):
                module.train()  # BatchNorm layers held in eval mode while frozen resume updating their statistics

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._frozen(trainer.current_epoch):
            for module in pl_module.net.modules():
                if isinstance(module, _BatchNorm) and module.training and module is not pl_module.net.get_classifier():
                    module.eval()
