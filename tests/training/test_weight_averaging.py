"""EMA and SWA of the weights (callbacks=ema|swa), against averages computed here from the weights each step or
epoch left behind; validation, checkpoints and the end of training use the average, never the untouched initial
copy that Lightning's callback holds before its first update."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from hpa_lightning.checkpoints import safe_torch_load
from hpa_lightning.inference.load import load_model
from hpa_lightning.training.callbacks import EMAWeightAverage, SWAWeightAverage
from tests.conftest import REPO, run_train
from tests.training.test_recipe import RandomRGBY, make_module

WEIGHT = "fc.weight"  # the head: trained from the first step in every epoch


class Recorder(L.Callback):
    """Live head weights after every step and epoch, and the head weights validation sees."""

    def __init__(self):
        self.steps, self.epochs, self.validated = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(pl_module.net.state_dict()[WEIGHT].clone())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append(pl_module.net.state_dict()[WEIGHT].clone())

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.validated.append(pl_module.net.state_dict()[WEIGHT].clone())


def fit(callbacks: list, epochs: int, tmp_path: Path):
    torch.manual_seed(0)
    module = make_module()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    data = DataLoader(RandomRGBY(), batch_size=8, shuffle=True)
    trainer.fit(module, data, DataLoader(RandomRGBY(n=8), batch_size=8))
    return module


def test_ema_is_the_exponential_average_of_every_step(tmp_path: Path) -> None:
    recorder = Recorder()
    module = fit([EMAWeightAverage(decay=0.5), recorder], 2, tmp_path)
    expected = recorder.steps[0]
    for weights in recorder.steps[1:]:
        expected = 0.5 * expected + 0.5 * weights
    torch.testing.assert_close(module.net.state_dict()[WEIGHT], expected)  # the average, after training
    assert not torch.allclose(expected, recorder.steps[-1])


def test_swa_averages_epoch_ends_from_its_start_and_is_safe_before(tmp_path: Path) -> None:
    recorder = Recorder()
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="epoch{epoch}", save_top_k=-1, monitor=None,
                           auto_insert_metric_name=False)
    module = fit([SWAWeightAverage(start_epoch=1), recorder, last], 3, tmp_path)
    live = recorder.epochs
    mean = (live[1] + live[2]) / 2
    torch.testing.assert_close(module.net.state_dict()[WEIGHT], mean)
    # before its first update (epoch 0) validation and the checkpoint see the live weights, not the initial copy
    torch.testing.assert_close(recorder.validated[0], live[0], rtol=0, atol=0)
    epoch0 = safe_torch_load(tmp_path / "ckpt" / "epoch0.ckpt")
    torch.testing.assert_close(epoch0["state_dict"][f"net.{WEIGHT}"], live[0], rtol=0, atol=0)
    assert "current_model_state" not in epoch0
    # from then on: the average including the epoch just trained, in validation and in the checkpoint's state_dict
    torch.testing.assert_close(recorder.validated[2], mean)
    epoch2 = safe_torch_load(tmp_path / "ckpt" / "epoch2.ckpt")
    torch.testing.assert_close(epoch2["state_dict"][f"net.{WEIGHT}"], mean)
    torch.testing.assert_close(epoch2["current_model_state"][f"net.{WEIGHT}"], live[2])


@pytest.mark.slow
def test_callbacks_ema_runs_end_to_end_and_predict_uses_the_average(shared_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(["+preset=tiny", "+experiment=focal_g02", "callbacks=ema", "callbacks.weight_averaging.decay=0.5",
                      f"hydra.run.dir={run_dir}"], shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WeightAveraging" not in proc.stderr  # no warning about checkpoints loaded outside fit
    results = json.loads((run_dir / "results.json").read_text())
    assert results["weight_averaging"] == {"method": "ema", "decay": 0.5, "update_starting_at_step": None}
    best = safe_torch_load(Path(results["best_checkpoint"]))
    averaged, live = best["state_dict"][f"net.{WEIGHT}"], best["current_model_state"][f"net.{WEIGHT}"]
    assert not torch.equal(averaged, live)
    torch.testing.assert_close(load_model(run_dir).net.state_dict()[WEIGHT], averaged, rtol=0, atol=0)
    from hpa_lightning.report import main as report_main

    assert report_main([str(run_dir), f"out={tmp_path / 'report'}"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| weights |" in report and "| ema |" in report
