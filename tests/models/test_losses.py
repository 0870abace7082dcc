import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from hpa_lightning.classes import NUM_CLASSES
from hpa_lightning.models.losses import FocalLoss, bce_loss, positive_class_weights


def _batch(seed: int, n: int = 16, c: int = NUM_CLASSES, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    targets = (torch.rand(n, c, generator=g) < 0.3).to(torch.float64)
    return logits, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gamma_zero_equals_bce(seed: int) -> None:
    logits, targets = _batch(seed)
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    torch.testing.assert_close(FocalLoss(gamma=0)(logits, targets), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(bce_loss()(logits, targets), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.2, 0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("seed", [0, 7])
def test_matches_torchvision_focal_loss(gamma: float, seed: int) -> None:
    logits, targets = _batch(seed)
    expected = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=gamma, reduction="mean")
    torch.testing.assert_close(FocalLoss(gamma=gamma)(logits, targets), expected, atol=1e-6, rtol=0)


def test_matches_torchvision_in_float32() -> None:
    logits, targets = _batch(3)
    logits, targets = logits.float(), targets.float()
    expected = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0, reduction="mean")
    torch.testing.assert_close(FocalLoss(gamma=2.0)(logits, targets), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.2, 1.0, 2.0])
def test_gradient_matches_torchvision(gamma: float) -> None:
    logits, targets = _batch(11, scale=2.0)
    ours = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    FocalLoss(gamma=gamma)(ours, targets).backward()
    sigmoid_focal_loss(ref, targets, alpha=-1, gamma=gamma, reduction="mean").backward()
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-8, rtol=1e-6)


def test_gamma_reduces_loss_of_easy_examples() -> None:
    logits = torch.tensor([[4.0, -4.0]])
    targets = torch.tensor([[1.0, 0.0]])
    assert FocalLoss(gamma=2.0)(logits, targets) < 1e-3 * bce_loss()(logits, targets)


@pytest.mark.parametrize("gamma", [0.0, 0.2, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_at_extreme_logits(gamma: float, dtype: torch.dtype) -> None:
    # All four (confident right / confident wrong) x (positive / negative) combinations.
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0]], dtype=dtype, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=dtype)
    loss = FocalLoss(gamma=gamma, pos_weight=[1.0, 2.0, 3.0, 4.0])(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # Wrong-by-100 terms dominate: loss ~ (100 + 4 * 100) / 4 with (1 - p_t)**gamma ~ 1.
    torch.testing.assert_close(loss.detach(), torch.tensor(125.0, dtype=dtype), atol=1e-3, rtol=0)
    # Correct-and-confident logits get (numerically) zero gradient; wrong ones are pushed the right way.
    assert logits.grad[0, 0].abs() < 1e-6 and logits.grad[0, 1].abs() < 1e-6
    assert logits.grad[0, 2] > 0 and logits.grad[0, 3] < 0


def test_half_precision_logits_are_computed_in_float32() -> None:
    logits, targets = _batch(5)
    loss = FocalLoss(gamma=2.0)(logits.to(torch.bfloat16), targets.to(torch.bfloat16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("seed", [0, 4])
def test_pos_weight_at_gamma_zero_equals_bce_pos_weight(seed: int) -> None:
    logits, targets = _batch(seed)
    weight = torch.linspace(0.5, 10.0, NUM_CLASSES, dtype=torch.float64)
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)
    torch.testing.assert_close(bce_loss(weight)(logits, targets), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(bce_loss(weight.tolist())(logits, targets), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(FocalLoss(0.0, np.asarray(weight))(logits, targets), expected, atol=1e-6, rtol=0)


def test_pos_weight_scales_only_positive_term_with_focal() -> None:
    logits, targets = _batch(9)
    weight = torch.full((NUM_CLASSES,), 3.0)
    per_elem = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0, reduction="none")
    expected = (per_elem * torch.where(targets > 0, 3.0, 1.0)).mean()
    torch.testing.assert_close(FocalLoss(2.0, weight)(logits, targets), expected, atol=1e-6, rtol=0)


def test_pos_weight_is_buffer_not_checkpointed() -> None:
    loss = FocalLoss(2.0, [2.0] * NUM_CLASSES)
    assert "pos_weight" in dict(loss.named_buffers())
    assert "pos_weight" not in loss.state_dict()
    assert loss.to(torch.float64).pos_weight.dtype == torch.float64  # follows module .to()
    assert FocalLoss().pos_weight is None


def test_pos_weight_length_must_match_classes() -> None:
    loss = FocalLoss(2.0, [1.0] * (NUM_CLASSES - 1))
    logits, targets = _batch(0)
    with pytest.raises(ValueError, match="pos_weight"):
        loss(logits, targets)


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [], [1.0, 0.0], [1.0, float("nan")]])
def test_invalid_pos_weight(bad: list) -> None:
    with pytest.raises(ValueError, match="loss.pos_weight"):
        FocalLoss(pos_weight=bad)


@pytest.mark.parametrize("gamma", [-0.1, -2, float("nan")])
def test_invalid_gamma(gamma: float) -> None:
    with pytest.raises(ValueError, match=r"loss\.gamma"):
        FocalLoss(gamma=gamma)


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        FocalLoss()(torch.zeros(2, 3), torch.zeros(2, 4))


def test_positive_class_weights() -> None:
    # 100 samples; class 0: 50 pos, class 1: 4 pos, class 2: 1 pos, class 3: none, class 4: all positive.
    labels = np.zeros((100, 5), dtype=np.uint8)
    labels[:50, 0] = 1
    labels[:4, 1] = 1
    labels[:1, 2] = 1
    labels[:, 4] = 1
    w = positive_class_weights(labels)
    np.testing.assert_allclose(w, [1.0, np.sqrt(96 / 4), np.sqrt(99.0), 1.0, 1.0])
    assert w.shape == (5,) and w.dtype == np.float64
    np.testing.assert_allclose(positive_class_weights(labels, power=1.0, max_weight=50.0), [1.0, 24.0, 50.0, 1.0, 1.0])
    np.testing.assert_allclose(positive_class_weights(labels.astype(bool), power=0.0), np.ones(5))
    # The weights feed straight into the loss.
    assert FocalLoss(2.0, positive_class_weights(labels).tolist()).pos_weight.shape == (5,)


def test_positive_class_weights_validation() -> None:
    with pytest.raises(ValueError, match="2-D"):
        positive_class_weights(np.zeros(5))
    with pytest.raises(ValueError, match="power"):
        positive_class_weights(np.zeros((2, 2)), power=-1)
    with pytest.raises(ValueError, match="max_weight"):
        positive_class_weights(np.zeros((2, 2)), max_weight=0.5)
