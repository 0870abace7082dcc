"""The poster's recipe: frozen first stage, differential LRs, SGDR restarts where configured, per-group LR trace."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from hpa_lightning.models.module import HPAModule
from hpa_lightning.models.schedulers import restart_steps, sgdr_factor
from hpa_lightning.training.callbacks import FreezeBackbone, LRTrace
from tests.conftest import REPO

SGDR = {"_target_": "hpa_lightning.models.schedulers.sgdr", "_partial_": True, "name": "sgdr", "cycle": 2,
        "cycle_unit": "epochs", "cycle_mult": 2.0, "min_lr_ratio": 0.01}


class RandomRGBY(Dataset):
    def __init__(self, n: int = 32, size: int = 32):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 4, size, size), dtype=torch.uint8, generator=generator)
        self.targets = (torch.rand(n, 28, generator=generator) < 0.2).float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "target": self.targets[i], "index": torch.tensor(i)}


def make_module(scheduler: dict | None = None, lr: float = 0.05) -> HPAModule:
    return HPAModule(model={"name": "resnet18", "pretrained": False},
                     loss={"_target_": "hpa_lightning.models.losses.FocalLoss", "name": "focal", "gamma": 0.2},
                     optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr, "momentum": 0.9,
                                "weight_decay": 1e-4},
                     scheduler=scheduler, augment=None, mean=[0.5] * 4, std=[0.25] * 4)


def fit(module: HPAModule, epochs: int, callbacks: list, tmp_path: Path) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, DataLoader(RandomRGBY(), batch_size=8, shuffle=True))
    return trainer


def snapshot(module: HPAModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


class Snapshots(L.Callback):
    def __init__(self):
        self.after_epoch: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: HPAModule) -> None:
        self.after_epoch.append(snapshot(pl_module))


def test_frozen_first_epoch_then_everything_trains(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = make_module()
    before = snapshot(module)
    snaps = Snapshots()
    fit(module, 2, [FreezeBackbone(frozen_epochs=1), snaps], tmp_path)
    frozen, unfrozen = snaps.after_epoch
    body = [k for k in before if not k.startswith("fc.") and "num_batches_tracked" not in k]
    for key in body:  # weights and BatchNorm running statistics alike
        torch.testing.assert_close(frozen[key], before[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(frozen["fc.weight"], before["fc.weight"])  # the head did train
    changed = [k for k in body if not torch.equal(unfrozen[k], frozen[k])]
    assert "conv1.weight" in changed and "layer4.1.conv2.weight" in changed and "bn1.running_mean" in changed
    assert all(p.requires_grad for p in module.parameters())


def test_no_freezing_trains_the_body_from_the_start(tmp_path: Path) -> None:
    module = make_module()
    before = snapshot(module)
    snaps = Snapshots()
    fit(module, 1, [FreezeBackbone(frozen_epochs=0), snaps], tmp_path)
    assert not torch.equal(snaps.after_epoch[0]["conv1.weight"], before["conv1.weight"])


def test_sgdr_factor_restarts_and_anneals() -> None:
    assert sgdr_factor(0, 10, 2.0, 0.0) == pytest.approx(1.0)
    assert sgdr_factor(5, 10, 2.0, 0.0) == pytest.approx(0.5)
    assert sgdr_factor(9, 10, 2.0, 0.1) < 0.15
    assert sgdr_factor(10, 10, 2.0, 0.0) == pytest.approx(1.0)  # restart
    assert sgdr_factor(20, 10, 2.0, 0.0) == pytest.approx(0.5)  # second cycle lasts 20
    assert sgdr_factor(30, 10, 2.0, 0.0) == pytest.approx(1.0)
    assert restart_steps(75, 10, 2.0) == [10, 30, 70]
    assert restart_steps(40, 10, 1.0) == [10, 20, 30]


def test_sgdr_restarts_land_where_configured_and_groups_keep_their_ratios(tmp_path: Path) -> None:
    module = make_module(SGDR, lr=0.09)
    trace = LRTrace(str(tmp_path))
    fit(module, 6, [FreezeBackbone(frozen_epochs=0), trace], tmp_path)  # 4 steps/epoch: cycles of 8 and 16 steps
    frame = pd.read_csv(tmp_path / "lr_trace.csv")
    assert (tmp_path / "lr_trace.png").is_file()
    assert list(frame["step"]) == list(range(24))
    head = frame["head"].to_numpy()
    jumps = [s for s in range(1, len(head)) if head[s] > head[s - 1] * 1.5]
    assert jumps == restart_steps(24, 8, 2.0) == [8]
    assert head[0] == pytest.approx(0.09) and head[8] == pytest.approx(0.09)
    assert head[7] < 0.09 * 0.1
    np.testing.assert_allclose(frame["early"] / frame["head"], 1 / 9, rtol=1e-6)
    np.testing.assert_allclose(frame["late"] / frame["head"], 1 / 3, rtol=1e-6)


@pytest.mark.parametrize(("name", "extra"), [("cosine", {"min_lr_ratio": 0.0}), ("constant", {})])
def test_other_schedules_keep_group_ratios(tmp_path: Path, name: str, extra: dict) -> None:
    scheduler = {"_target_": f"hpa_lightning.models.schedulers.{name}", "_partial_": True, "warmup_steps": 3, **extra}
    module = make_module(scheduler, lr=0.09)
    trace = LRTrace(str(tmp_path))
    fit(module, 2, [FreezeBackbone(frozen_epochs=0), trace], tmp_path)
    frame = pd.DataFrame(trace.rows)
    np.testing.assert_allclose(frame["early"] / frame["head"], 1 / 9, rtol=1e-6)
    head = frame["head"].to_numpy()
    assert head[0] == pytest.approx(0.03) and head[2] == pytest.approx(0.09 * (1 if name == "constant" else
                                                                              0.5 * (1 + math.cos(math.pi * 2 / 8))))


@pytest.mark.slow
def test_lr_finder_writes_curve_plot_and_suggestion(tmp_path: Path, shared_cache: Path) -> None:
    import json

    from tests.conftest import run_train

    proc = run_train(["+preset=tiny", "lr_find.num_training=30", "lr_find.skip_begin=3", "lr_find.skip_end=2",
                      f"hydra.run.dir={tmp_path / 'lrf'}"], shared_cache, REPO,
                     module="hpa_lightning.lr_find")
    assert proc.returncode == 0, proc.stderr[-2000:]
    frame = pd.read_csv(tmp_path / "lrf" / "lr_find.csv")
    assert len(frame) == 30 and frame["lr"].is_monotonic_increasing
    assert frame["lr"].iloc[-1] / frame["lr"].iloc[0] > 1e3  # an exponential sweep
    summary = json.loads((tmp_path / "lrf" / "lr_find.json").read_text())
    assert frame["lr"].min() <= summary["suggested_lr"] <= frame["lr"].max()
    assert (tmp_path / "lrf" / "lr_find.png").stat().st_size > 1000
    assert f"suggested learning rate: {summary['suggested_lr']:.3g}" in proc.stdout


def test_repeat_factors_favour_rare_classes() -> None:
    from hpa_lightning.data.datamodule import repeat_factors

    labels = np.zeros((100, 3), dtype=np.uint8)
    labels[:, 0] = 1          # everywhere
    labels[:2, 1] = 1         # 2 % of samples
    labels[50:60, 2] = 1      # 10 %
    factors = repeat_factors(labels, threshold=0.08)
    assert factors[0] == pytest.approx(math.sqrt(0.08 / 0.02))
    assert factors[55] == 1.0 and factors[80] == 1.0


@pytest.mark.slow
def test_imbalance_options_reach_the_run_and_are_recorded(tmp_path: Path, shared_cache: Path) -> None:
    import json

    from tests.conftest import run_train

    run_dir = tmp_path / "imb"
    proc = run_train(["+experiment=bce", "+preset=tiny", "trainer.max_epochs=1", "loss.pos_weight=auto",
                      "data.oversample=true", "data.oversample_threshold=0.2", f"hydra.run.dir={run_dir}"],
                     shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    imbalance = results["imbalance"]
    weights = np.array(imbalance["pos_weight"])
    assert weights.shape == (28,) and weights.min() >= 1.0 and weights.max() > 2.0
    assert weights[0] < weights[27] or weights[27] == 1.0  # Nucleoplasm (common) weighs less than a rare class
    assert imbalance["oversample"] is True
    assert imbalance["train_samples_per_epoch"] > results["data"]["split"]["train"]
    checkpoint = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["loss"]["pos_weight"] == imbalance["pos_weight"]
