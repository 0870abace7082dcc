"""DDP on CPU (2 processes, gloo): identical ranks through the frozen epoch and after, exact metrics and predictions,
rank-0-only outputs, no sweep relaunch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hpa_lightning import metrics
from hpa_lightning.models.module import HPAModule
from tests.conftest import REPO, run_train

pytestmark = pytest.mark.slow
TINY_DDP = ["+experiment=focal_g02", "+preset=tiny", "trainer=ddp_cpu", "trainer.max_epochs=2",
            "data.synthetic.n=150", "data.image_size=24", "data.eval_batch_size=7"]


def run_recipe(out: Path, mode: str) -> dict[tuple[int, int], dict]:
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = REPO / "tests" / "training" / "ddp_recipe.py"
    proc = subprocess.run([sys.executable, str(script), str(out), mode], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = {}
    for path in out.glob("rank*_epoch*.pt"):
        rank, epoch = (int(part) for part in path.stem.removeprefix("rank").split("_epoch"))
        saved[rank, epoch] = torch.load(path, weights_only=True)
    return saved


def test_ddp_ranks_stay_identical_through_the_frozen_epoch_and_after(tmp_path: Path) -> None:
    ddp = run_recipe(tmp_path / "ddp", "ddp")
    single = run_recipe(tmp_path / "single", "single")
    from tests.training.ddp_recipe import EPOCHS

    assert sorted(ddp) == [(r, e) for r in (0, 1) for e in range(EPOCHS)]
    params = [k for k in ddp[0, 0]["state"] if "running_" not in k and "num_batches" not in k]
    for epoch in range(EPOCHS):
        rank0, rank1 = ddp[0, epoch]["state"], ddp[1, epoch]["state"]
        differing = [k for k in params if not torch.equal(rank0[k], rank1[k])]
        assert not differing, f"epoch {epoch}: {len(differing)} of {len(params)} tensors differ, e.g. {differing[:3]}"
    body = [k for k in params if not k.startswith("fc.")]
    # frozen stage: no optimizer state (so no momentum or weight decay) on the body, BatchNorm statistics unchanged
    assert ddp[0, 0]["with_optimizer_state"] == ["fc.bias", "fc.weight"]
    assert set(body) <= set(ddp[0, 1]["with_optimizer_state"])  # after the unfreeze every parameter trains
    # the frozen epoch is well defined across process counts (BatchNorm in eval mode): DDP over 2 x 8 samples per step
    # reaches what one process reaches over the same 16 samples
    for key, value in single[0, 0]["state"].items():
        torch.testing.assert_close(ddp[0, 0]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    convolutions = [k for k in body if ddp[0, 0]["state"][k].ndim == 4]
    assert all(not torch.equal(ddp[0, 1]["state"][k], ddp[0, 0]["state"][k]) for k in convolutions)


def test_two_process_ddp_metrics_equal_a_single_process_evaluation(tmp_path: Path, shared_cache: Path) -> None:
    run_dir = tmp_path / "ddp"
    # reader threads: Lightning re-creates the ThreadedDataLoader with a DistributedSampler on each rank
    proc = run_train([*TINY_DDP, "data.num_workers=2", "data.worker_type=thread", f"hydra.run.dir={run_dir}"],
                     shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # rank 1 wrote into the same folder, nowhere else
    results = json.loads((run_dir / "results.json").read_text())
    predictions = pd.read_csv(run_dir / "test_predictions.csv")
    split = pd.read_csv(run_dir / "split.csv")
    test_ids = split.loc[split["split"] == "test", "Id"]
    # 15 test samples over 2 ranks and batches of 7: the sampler pads, yet each Id appears exactly once
    assert predictions["Id"].is_unique and set(predictions["Id"]) == set(test_ids)
    assert results["test"]["n_samples"] == len(test_ids)

    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = instantiate(cfg.data, num_workers=0, persistent_workers=False)
    datamodule.prepare_data()
    datamodule.setup("test")
    module = HPAModule.load_from_checkpoint(results["best_checkpoint"], map_location="cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    single = module.epoch_results["test"]
    summary = metrics.summarize(single["targets"], single["probs"])
    assert summary["macro_f1"] == pytest.approx(results["test"]["macro_f1"], abs=1e-6)
    assert summary["roc_auc"] == pytest.approx(results["test"]["roc_auc"], abs=1e-6)
    by_id = predictions.set_index("Id").loc[datamodule.ids(single["rows"])]
    np.testing.assert_allclose(by_id[[f"prob_{c}" for c in range(28)]].to_numpy(), single["probs"], atol=2e-6)


def test_ddp_job_inside_a_multirun_stays_in_its_job_folder(tmp_path: Path, shared_cache: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_train(["-m", *TINY_DDP, "loss.gamma=0.2,1.0", f"hydra.sweep.dir={sweep_dir}",
                      f"paths.log_dir={tmp_path / 'logs'}"], shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        results = json.loads((sweep_dir / job / "results.json").read_text())
        assert results["gamma"] == [0.2, 1.0][int(job)]
    assert not (tmp_path / "logs").exists()  # no stray run folder from a re-launched child
    assert proc.stdout.count("run folder:") == 2
