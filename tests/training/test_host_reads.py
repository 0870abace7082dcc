"""A training step that never makes the host wait for the device.

On a GPU every `.item()`, `if tensor:`, `nonzero()` or `tolist()` blocks Python until the GPU has finished everything
queued, so the next step's kernels cannot be queued behind the running ones. Counted here on the CPU by wrapping
those calls, for the default recipe (focal_g02, the poster's augmentation, the default callbacks, a progress bar):
the median step reads nothing; the non-finite-loss check still stops a run, at the next logging step.
"""

from __future__ import annotations

import collections
import statistics
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from hpa_lightning.errors import NonFiniteLossError
from hpa_lightning.models.module import HPAModule
from hpa_lightning.runs.outputs import plain
from hpa_lightning.training.job import build_callbacks
from tests.conftest import compose_config

READS = ("item", "__bool__", "nonzero", "tolist", "__float__", "__int__", "__index__")


class RandomBatches(Dataset):
    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int) -> dict:
        generator = torch.Generator().manual_seed(i)
        return {"image": torch.randint(0, 256, (4, 24, 24), dtype=torch.uint8, generator=generator),
                "target": (torch.rand(28, generator=generator) > 0.8).float(), "index": torch.tensor(i)}


class ReadCounter(L.Callback):
    """Host reads between the ends of consecutive training batches (batch transfer and augmentation included)."""

    def __init__(self) -> None:
        self.counting, self.count, self.per_step = False, 0, []
        self.where: collections.Counter = collections.Counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.counting, self.count = True, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.per_step.append(self.count)
        self.count = 0

    def on_train_end(self, trainer, pl_module) -> None:
        self.counting = False


@pytest.fixture
def counter(monkeypatch) -> ReadCounter:
    import traceback

    counter = ReadCounter()

    def counted(original):
        def read(*args, **kwargs):
            if counter.counting:
                counter.count += 1
                frame = traceback.extract_stack(limit=3)[0]
                counter.where[f"{frame.filename}:{frame.lineno}"] += 1
            return original(*args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", counted(torch.nonzero))
    return counter


def default_recipe(tmp_path: Path, extra: list[str] = ()) -> tuple[HPAModule, list[L.Callback]]:
    cfg = compose_config(["+experiment=focal_g02", "model=resnet10t", "model.pretrained=false",
                          "finetune.frozen_epochs=1", "finetune.lr_ratios=[0.1,0.3,1.0]",
                          f"paths.output_dir={tmp_path}", *extra])
    module = HPAModule(model=plain(cfg.model), loss=plain(cfg.loss), optimizer=plain(cfg.optimizer),
                       scheduler=plain(cfg.scheduler), lr_ratios=list(cfg.finetune.lr_ratios),
                       augment=plain(cfg.augment), mean=[0.1] * 4, std=[0.2] * 4)
    return module, build_callbacks(cfg)


def fit(module: HPAModule, callbacks: list[L.Callback], epochs: int = 2) -> None:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, log_every_n_steps=6,
                        callbacks=callbacks, enable_progress_bar=True, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(RandomBatches(), batch_size=4))


def test_a_steady_state_step_reads_nothing_back(counter: ReadCounter, tmp_path: Path) -> None:
    module, callbacks = default_recipe(tmp_path)
    assert any(type(step).__name__ == "RandomRot90" for step in module.transform.augment)  # the poster's pipeline
    fit(module, [*callbacks, counter])  # the frozen epoch, then everything trains
    steps = counter.per_step
    assert len(steps) == 24
    assert statistics.median(steps) == 0, counter.where.most_common(5)
    # logging steps (every 6th) and the epochs' ends aside, no step reads
    assert sum(1 for n in steps if n) <= len(steps) // 6 + 2, (steps, counter.where.most_common(5))


def test_a_non_finite_loss_still_stops_the_run(tmp_path: Path) -> None:
    module, callbacks = default_recipe(tmp_path)

    class GoesNaN(torch.nn.Module):
        calls = 0

        def forward(self, logits, targets):
            GoesNaN.calls += 1
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
            return loss * float("nan") if GoesNaN.calls >= 3 else loss

    module.criterion = GoesNaN()
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at epoch 0, by step 6;"):
        fit(module, [c for c in callbacks if type(c).__name__ != "FiniteCheckpointGuard"], epochs=1)
    assert GoesNaN.calls == 7  # stopped at the first logging step after it went NaN (step 6), not at the end


@pytest.mark.parametrize(("cuda", "bf16", "precision", "fast"), [
    (True, True, "bf16-mixed", True), (True, False, "16-mixed", True), (False, False, "32-true", False)])
def test_fast_defaults_where_the_run_lands(monkeypatch, cuda: bool, bf16: bool, precision: str, fast: bool) -> None:
    from hpa_lightning.training.speed import resolve_speed_defaults

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    cfg = compose_config(["+experiment=focal_g02"])
    assert resolve_speed_defaults(cfg) == {"precision": precision, "benchmark": fast, "channels_last": fast}
    assert cfg.trainer.precision == precision and cfg.channels_last is fast and cfg.trainer.benchmark is fast
    kept = compose_config(["+experiment=focal_g02", "trainer.precision=32-true", "channels_last=false",
                           "trainer.benchmark=false"])
    assert resolve_speed_defaults(kept) == {} and kept.trainer.precision == "32-true" and not kept.channels_last
    assert kept.trainer.benchmark is False
    cpu = compose_config(["+experiment=focal_g02", "trainer=cpu"])  # an explicit CPU run on a GPU machine
    assert resolve_speed_defaults(cpu) == {"precision": "32-true", "benchmark": False, "channels_last": False}
    assert compose_config(["trainer=gpu"]).trainer.precision == "bf16-mixed"  # the explicit form stays
    # a deterministic run keeps cuDNN's default choice: a timed choice may differ from run to run
    deterministic = compose_config(["+experiment=focal_g02", "trainer.deterministic=true"])
    assert resolve_speed_defaults(deterministic)["benchmark"] is False


def test_benchmark_reaches_the_trainer(monkeypatch, tmp_path: Path) -> None:
    """The resolved value is what Lightning applies to torch.backends.cudnn (it leaves cudnn.benchmark off unless
    told), for the GPU trainer config as for the default."""
    from hydra.utils import instantiate

    from hpa_lightning.training.speed import resolve_speed_defaults

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = compose_config(["+experiment=focal_g02", "trainer=gpu", "trainer.devices=1"])
    assert resolve_speed_defaults(cfg)["benchmark"] is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # build it on this CPU machine
    instantiate(cfg.trainer, accelerator="cpu", strategy="auto", precision="32-true", logger=False,
                default_root_dir=str(tmp_path))
    assert torch.backends.cudnn.benchmark is True
