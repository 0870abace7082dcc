"""The evaluation epoch's metric (hpa_lightning.models.epoch_metrics): torchmetrics' numbers, sklearn's to float32
precision, each store row once (also over two gloo processes), nothing in checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.metrics import f1_score, roc_auc_score
from torchmetrics.functional.classification import multilabel_auroc, multilabel_f1_score

from hpa_lightning.models.epoch_metrics import EpochOutputs
from hpa_lightning.models.module import HPAModule
from tests.models.epoch_metrics_ddp import C, ddp_worker, epoch_data, feed

# torchmetrics computes F1 and AUROC in float32 whatever the input dtype: ~1e-7 from sklearn's float64 values
FLOAT32_TOL = 1e-6


def sklearn_scores(targets: np.ndarray, probs: np.ndarray) -> tuple[float, np.ndarray, float]:
    preds = (probs >= 0.5).astype(int)
    valid = (targets.sum(0) > 0) & (targets.sum(0) < len(targets))
    return (f1_score(targets, preds, average="macro", zero_division=0),
            f1_score(targets, preds, average=None, zero_division=0),
            roc_auc_score(targets[:, valid], probs[:, valid], average="macro"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_are_sklearns_and_each_row_counts_once(seed: int) -> None:
    targets, probs = epoch_data(seed)
    assert (probs == 0.5).any() and targets[:, 1].sum() == len(targets) - 1
    rng = np.random.default_rng(seed + 10)
    rows = rng.permutation(len(targets)) + 1000  # store rows, not positions
    by_row = np.argsort(rows)
    # as DDP's padding does: some samples come again (the same row, the same outputs), one of them three times
    again = np.r_[rng.choice(len(rows), 5, replace=False), 0, 0]
    seen = np.r_[np.arange(len(rows)), again]
    metric = EpochOutputs(C)
    feed(metric, targets[seen], probs[seen], rows[seen])
    result = metric.compute()

    outputs, summary = result["outputs"], result["summary"]
    np.testing.assert_array_equal(outputs["rows"], rows[by_row])
    np.testing.assert_array_equal(outputs["probs"], probs[by_row])
    np.testing.assert_array_equal(outputs["targets"], targets[by_row])
    macro, per_class, auc = sklearn_scores(targets, probs)
    assert summary["n_samples"] == len(rows) and summary["n_auc_classes"] == C - 1
    assert math.isclose(summary["macro_f1"], macro, abs_tol=FLOAT32_TOL)
    np.testing.assert_allclose(summary["per_class_f1"], per_class, rtol=0, atol=FLOAT32_TOL)
    assert math.isclose(summary["roc_auc"], auc, abs_tol=FLOAT32_TOL)
    # counted again, the repeats would have moved the AUC (by ~5e-3, far beyond float32): the match above is the
    # deduplication's doing
    assert not math.isclose(sklearn_scores(targets[seen], probs[seen])[2], auc, abs_tol=1e-3)


def test_the_scores_are_torchmetrics_functional() -> None:
    """The summary's per-class F1 and AUROC are torchmetrics.functional's values bit for bit (float32, where a numpy
    float64 implementation would differ in the last digits); macro F1 and AUC are their means, torchmetrics' own
    macro averages to float32 precision."""
    targets, probs = epoch_data(3, n=400)
    metric = EpochOutputs(C)
    feed(metric, targets, probs, np.arange(len(targets)))
    summary = metric.compute()["summary"]
    y, p = torch.from_numpy(targets).long(), torch.from_numpy(probs).double()
    # probabilities of exactly 0.5 are positive here, as in sklearn's `p >= 0.5`; torchmetrics thresholds with `>`
    preds = (p >= 0.5).long()
    f1 = multilabel_f1_score(preds, y, num_labels=C, average="none", zero_division=0)
    assert summary["per_class_f1"] == f1.double().tolist()
    assert summary["macro_f1"] == pytest.approx(
        multilabel_f1_score(preds, y, num_labels=C, average="macro").item(), abs=FLOAT32_TOL)
    valid = (y.sum(0) > 0) & (y.sum(0) < len(y))
    per_class = multilabel_auroc(p[:, valid], y[:, valid], num_labels=int(valid.sum()), average="none")
    assert [v for v in summary["per_class_roc_auc"] if v is not None] == per_class.double().tolist()
    assert [v is None for v in summary["per_class_roc_auc"]] == (~valid).tolist()
    auc = multilabel_auroc(p[:, valid], y[:, valid], num_labels=int(valid.sum()), average="macro")
    assert summary["roc_auc"] == pytest.approx(auc.item(), abs=FLOAT32_TOL)


def test_an_empty_epoch_has_no_summary_and_empty_outputs() -> None:
    metric = EpochOutputs(C)
    with pytest.warns(UserWarning, match="before the ``update``"):
        result = metric.compute()
    assert result["summary"] is None
    assert result["outputs"]["probs"].shape == result["outputs"]["targets"].shape == (0, C)
    assert result["outputs"]["rows"].shape == (0,) and result["outputs"]["rows"].dtype == np.int64


def test_reset_starts_the_next_epoch_empty() -> None:
    targets, probs = epoch_data(4)
    metric = EpochOutputs(C)
    feed(metric, targets, probs, np.arange(len(targets)))
    metric.compute()
    metric.reset()
    feed(metric, targets[:10], probs[:10], np.arange(10))
    assert metric.compute()["summary"]["n_samples"] == 10


def test_update_refuses_mismatched_shapes() -> None:
    metric = EpochOutputs(C)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        metric.update(torch.zeros(3, C + 1), torch.zeros(3, C + 1), torch.arange(3))
    with pytest.raises(ValueError, match="rows"):
        metric.update(torch.zeros(3, C), torch.zeros(3, C), torch.arange(4))


def test_the_metric_states_stay_out_of_checkpoints() -> None:
    """Checkpoints written before the module held these metrics load strictly, and new ones are the same."""
    def module() -> HPAModule:
        return HPAModule(model={"name": "resnet10t", "pretrained": False},
                         loss={"_target_": "hpa_lightning.models.losses.FocalLoss", "gamma": 0.2},
                         optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.02})

    trained = module()
    targets, probs = epoch_data(5, n=10)
    for stage in ("val", "test"):
        probs28, targets28 = np.resize(probs, (10, 28)), np.resize(targets, (10, 28))
        feed(trained.epoch_outputs[stage], targets28, probs28, np.arange(10))
    state = trained.state_dict()
    assert not [key for key in state if key.startswith("epoch_outputs")]
    assert {key.split(".")[0] for key in state} <= {"net", "transform", "criterion"}
    fresh = module()
    fresh.load_state_dict(state, strict=True)


def test_two_gloo_processes_count_each_row_once(tmp_path: Path) -> None:
    world = 2  # 41 samples: the sampler pads one
    mp.start_processes(ddp_worker, args=(world, str(tmp_path)), nprocs=world, start_method="spawn")
    targets, probs = epoch_data(6, n=41)
    macro, _, auc = sklearn_scores(targets, probs)
    for rank in range(world):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        np.testing.assert_array_equal(saved["rows"].numpy(), np.arange(41) + 500)
        assert math.isclose(saved["macro_f1"], macro, abs_tol=FLOAT32_TOL)
        assert math.isclose(saved["roc_auc"], auc, abs_tol=FLOAT32_TOL)
        assert saved["local"] > 1  # compute restored the rank's own batches after the gather
