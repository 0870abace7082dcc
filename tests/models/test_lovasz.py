"""The multi-label Lovasz hinge against a brute-force reference, and weighted sums of losses from config.

The reference uses only the definition (Berman et al., 2018): the Lovasz extension of a submodular set function is
the maximum, over all orderings of the elements, of the errors weighted by the function's increments; the Jaccard
loss of a set M of mispredicted elements is |M| / |P u M| with P the positives. Nothing of the implementation's
sorting or gradient trick is reused.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hpa_lightning.models.losses import FocalLoss, LovaszHingeLoss, WeightedLossSum
from hpa_lightning.models.module import HPAModule
from hpa_lightning.targets import ALLOWED_TARGETS
from tests.conftest import compose_config


def jaccard_loss(mispredicted: frozenset[int], positives: frozenset[int]) -> float:
    union = positives | mispredicted
    return len(mispredicted) / len(union) if union else 0.0


def brute_force_lovasz_hinge(logits: np.ndarray, labels: np.ndarray) -> float:
    signs = 2.0 * labels - 1.0
    errors = np.maximum(1.0 - logits * signs, 0.0)
    positives = frozenset(np.flatnonzero(labels == 1).tolist())
    best = -np.inf
    for order in itertools.permutations(range(len(errors))):
        total, previous, taken = 0.0, 0.0, set()
        for i in order:
            taken.add(i)
            value = jaccard_loss(frozenset(taken), positives)
            total += errors[i] * (value - previous)
            previous = value
        best = max(best, total)
    return float(best)


@pytest.mark.parametrize("seed", range(12))
def test_flat_lovasz_hinge_equals_the_brute_force_extension(seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch, classes = (2, 3) if seed % 2 else (1, 6)
    logits = rng.normal(0, 2, (batch, classes))
    labels = (rng.random((batch, classes)) < [0.0, 0.3, 0.7, 1.0][seed % 4]).astype(np.float64)
    got = LovaszHingeLoss(per_image=False)(torch.tensor(logits), torch.tensor(labels)).item()
    assert got == pytest.approx(brute_force_lovasz_hinge(logits.ravel(), labels.ravel()), abs=1e-9)


def test_per_image_lovasz_hinge_is_the_mean_of_each_image() -> None:
    rng = np.random.default_rng(7)
    logits, labels = rng.normal(0, 2, (3, 5)), (rng.random((3, 5)) < 0.4).astype(np.float64)
    expected = np.mean([brute_force_lovasz_hinge(logits[i], labels[i]) for i in range(3)])
    got = LovaszHingeLoss(per_image=True)(torch.tensor(logits), torch.tensor(labels)).item()
    assert got == pytest.approx(expected, abs=1e-9)


def test_lovasz_hinge_gradient_is_finite_and_descends() -> None:
    torch.manual_seed(0)
    labels = (torch.rand(16, 28) < 0.1).float()
    logits = torch.zeros(16, 28, requires_grad=True)
    loss_fn = LovaszHingeLoss()
    optimizer = torch.optim.SGD([logits], lr=20.0)  # the increments share a total of 1 over 448 elements
    first = None
    for _ in range(60):
        optimizer.zero_grad()
        loss = loss_fn(logits, labels)
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        first = loss.item() if first is None else first
        optimizer.step()
    assert first == pytest.approx(1.0) and loss.item() < 0.05  # all-zero logits: every element at hinge 1


def test_weighted_sum_is_the_sum_of_its_weighted_terms() -> None:
    torch.manual_seed(1)
    logits, labels = torch.randn(8, 28), (torch.rand(8, 28) < 0.2).float()
    focal, lovasz = FocalLoss(gamma=1.0), LovaszHingeLoss()
    total = WeightedLossSum(losses=[focal, lovasz], weights=[1.0, 0.5])
    assert total(logits, labels).item() == pytest.approx(focal(logits, labels).item()
                                                          + 0.5 * lovasz(logits, labels).item(), rel=1e-6)
    with pytest.raises(ValueError, match="weights"):
        WeightedLossSum(losses=[focal, lovasz], weights=[1.0])
    shared = WeightedLossSum(losses=[FocalLoss(), lovasz], gamma=0.5, pos_weight=[2.0] * 28)
    assert shared.losses[0].gamma == 0.5 and shared.losses[0].pos_weight.tolist() == [2.0] * 28
    with pytest.raises(ValueError, match="gamma"):
        WeightedLossSum(losses=[FocalLoss(), lovasz], gamma=-1.0)


def test_focal_lovasz_config_builds_the_sum_and_survives_a_checkpoint(tmp_path) -> None:
    cfg = compose_config(["+experiment=focal_g02", "loss=focal_lovasz"])
    assert cfg.loss._target_ == "hpa_lightning.models.losses.WeightedLossSum"
    from hpa_lightning.runs.outputs import plain

    module = HPAModule(model={"name": "resnet10t", "pretrained": False}, loss=plain(cfg.loss),
                       optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    assert isinstance(module.criterion, WeightedLossSum)
    assert [type(term).__name__ for term in module.criterion.losses] == ["FocalLoss", "LovaszHingeLoss"]
    assert module.criterion.losses[0].gamma == pytest.approx(0.2)  # the experiment's gamma reaches the focal term
    path = tmp_path / "m.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "pytorch-lightning_version": "2.6.6"}, path)
    assert isinstance(HPAModule.load_from_checkpoint(path, map_location="cpu").criterion, WeightedLossSum)
    assert {"hpa_lightning.models.losses.WeightedLossSum", "hpa_lightning.models.losses.LovaszHingeLoss"} <= set(
        ALLOWED_TARGETS)
