"""The poster's recipe on fixed data, run by tests/training/test_ddp.py as a script so that Lightning's real DDP
launcher can re-launch it: frozen first epoch, unfreeze, differential LRs, SGDR, focal loss, momentum and weight decay.

    python tests/training/ddp_recipe.py OUT ddp      two gloo processes, 8 samples per rank and step
    python tests/training/ddp_recipe.py OUT single   one process, the same 16 samples per step

Each rank writes OUT/rank{R}_epoch{E}.pt after every epoch: the network's state and the names of the parameters that
hold optimizer state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from hpa_lightning.models.module import HPAModule
from hpa_lightning.training.callbacks import FreezeBackbone
from tests.training.test_recipe import RandomRGBY

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3
SAMPLES = 64


class FixedOrder(L.LightningDataModule):
    """No shuffling: rank r of 2 takes samples r, r+2, ..., so a DDP step sees the same 16 samples as one step of a
    single process (Lightning's own distributed sampler would shuffle)."""

    def train_dataloader(self) -> DataLoader:
        dataset, world = RandomRGBY(n=SAMPLES), self.trainer.world_size
        sampler = DistributedSampler(dataset, world, self.trainer.global_rank, shuffle=False) if world > 1 else None
        return DataLoader(dataset, batch_size=16 // world, sampler=sampler, shuffle=False)


class SaveEpochState(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: HPAModule) -> None:
        optimizer = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.net.named_parameters()}
        with_state = sorted(names[id(p)] for group in optimizer.param_groups for p in group["params"]
                            if optimizer.state.get(p))
        state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        torch.save({"state": state, "with_optimizer_state": with_state},
                   self.out / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt")


def main(out: Path, mode: str) -> None:
    L.seed_everything(0)
    module = HPAModule(
        model={"name": "resnet18", "pretrained": False},
        loss={"_target_": "hpa_lightning.models.losses.FocalLoss", "name": "focal", "gamma": 0.2},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9,
                   "weight_decay": 1e-4},
        scheduler={"_target_": "hpa_lightning.models.schedulers.sgdr", "_partial_": True, "name": "sgdr", "cycle": 1,
                   "cycle_unit": "epochs", "cycle_mult": 2.0, "min_lr_ratio": 0.01},
        augment=None, mean=[0.5] * 4, std=[0.25] * 4)
    ddp = mode == "ddp"
    # the strategy the project's trainer=ddp_cpu config asks for
    strategy = OmegaConf.load(REPO / "conf" / "trainer" / "ddp_cpu.yaml")["strategy"] if ddp else "auto"
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=2 if ddp else 1, strategy=strategy,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False, callbacks=[FreezeBackbone(frozen_epochs=1), SaveEpochState(out)])
    trainer.fit(module, datamodule=FixedOrder())


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
