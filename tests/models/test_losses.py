# Mutation testing (`make mutation`, tests/mutation.py): the mutants of hpa_lightning/models/losses.py these tests
# do not kill, judged equivalent:
# - `register_buffer(..., persistent=None)`: None is falsy, as False (pos_weight stays out of the state dict).
# - `logits / (2.0 * labels - 1.0)` in the Lovasz hinge: for 0/1 labels the sign is +1 or -1, and dividing by it is
#   multiplying.

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from hpa_lightning.classes import NUM_CLASSES
from hpa_lightning.models.losses import FocalLoss, LovaszHingeLoss, WeightedLossSum, bce_loss, positive_class_weights


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


# ---------------------------------------------------------------------------------- defaults, half precision, messages


def test_defaults_are_pinned() -> None:
    """The values a config that leaves them out gets (conf/loss/*.yaml set gamma; the rest rely on these)."""
    focal = FocalLoss()
    assert focal.gamma == 2.0 and focal.pos_weight is None and repr(focal) == "FocalLoss(gamma=2.0, pos_weight=None)"
    logits, targets = _batch(12)
    torch.testing.assert_close(focal(logits, targets), sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0,
                                                                          reduction="mean"), rtol=1e-12, atol=0)
    bce = bce_loss()
    assert bce.gamma == 0.0 and bce.pos_weight is None
    assert repr(FocalLoss(0.5, [1.0, 2.0, 3.0])) == "FocalLoss(gamma=0.5, pos_weight=<3 classes>)"
    lovasz = LovaszHingeLoss()
    assert lovasz.per_image is False and repr(lovasz) == "LovaszHingeLoss(per_image=False)"
    assert LovaszHingeLoss(per_image=1).per_image is True
    total = WeightedLossSum([FocalLoss(gamma=1.0), lovasz])
    assert total.weights == [1.0, 1.0] and total.losses[0].gamma == 1.0 and total.losses[0].pos_weight is None
    # positive_class_weights: power 0.5, max_weight 50 (1 positive in 3001: sqrt(3000) = 54.8, clipped)
    labels = np.zeros((3001, 2), dtype=np.uint8)
    labels[:1, 0] = 1
    labels[:30, 1] = 1
    np.testing.assert_array_equal(positive_class_weights(labels), [50.0, np.sqrt(2971 / 30)])


def _half_precision_cases() -> list[tuple[str, torch.nn.Module]]:
    weight = torch.linspace(0.5, 4.0, NUM_CLASSES)
    return [("focal", FocalLoss(2.0)), ("focal_weighted", FocalLoss(0.5, weight)), ("bce", bce_loss(weight)),
            ("lovasz", LovaszHingeLoss()), ("lovasz_per_image", LovaszHingeLoss(per_image=True)),
            ("sum", WeightedLossSum([FocalLoss(0.2), LovaszHingeLoss()], weights=[1.0, 0.5]))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(6), ids=[name for name, _ in _half_precision_cases()])
def test_half_precision_inputs_give_the_float32_result(case: int, dtype: torch.dtype) -> None:
    """Under AMP the logits arrive in bf16/fp16: every loss computes in float32 from the rounded values, exactly as
    if they had been given in float32, and returns float32 (in half precision the Lovasz sort and cumulative sums
    and the focal exp/log lose several digits)."""
    _, loss = _half_precision_cases()[case]
    logits, targets = _batch(case, scale=4.0)
    half = logits.to(dtype).requires_grad_(True)
    got = loss(half, targets.to(dtype))
    expected = loss(half.detach().float(), targets.float())
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    got.backward()
    assert half.grad.dtype == dtype and torch.isfinite(half.grad).all()


def test_a_loss_that_skipped_the_upcast_would_be_seen() -> None:
    """The comparison above is not vacuous: the same Lovasz hinge run in bf16 differs from the float32 result."""
    from hpa_lightning.models.losses import _flat_lovasz_hinge

    logits, targets = _batch(2, scale=4.0)
    half, labels = logits.to(torch.bfloat16).reshape(-1), targets.to(torch.bfloat16).reshape(-1)
    in_bf16 = _flat_lovasz_hinge(half, labels)
    assert in_bf16.dtype == torch.bfloat16
    assert in_bf16.float() != LovaszHingeLoss()(logits.to(torch.bfloat16), targets.to(torch.bfloat16))


@pytest.mark.parametrize(("build", "message"), [
    (lambda: FocalLoss(gamma=-0.1), "loss.gamma must be a finite number >= 0, got -0.1"),
    (lambda: FocalLoss(gamma=float("inf")), "loss.gamma must be a finite number >= 0, got inf"),
    (lambda: FocalLoss(pos_weight=[[1.0, 2.0]]),
     "loss.pos_weight must be a non-empty 1-D sequence of per-class weights, got shape (1, 2)"),
    (lambda: FocalLoss(pos_weight=[]), "loss.pos_weight must be a non-empty 1-D sequence of per-class weights, got "
                                       "shape (0,)"),
    (lambda: FocalLoss(pos_weight=[1.0, -2.0]), "loss.pos_weight must be finite and > 0 for every class"),
    (lambda: FocalLoss(pos_weight=torch.tensor([1.0, 0.0])), "loss.pos_weight must be finite and > 0 for every class"),
    (lambda: bce_loss(np.array([1.0, np.inf])), "loss.pos_weight must be finite and > 0 for every class"),
    (lambda: WeightedLossSum([]), "loss.losses must name at least one loss"),
    (lambda: WeightedLossSum([FocalLoss(), LovaszHingeLoss()], weights=[1.0]),
     "loss.weights has 1 entries for 2 losses"),
    (lambda: WeightedLossSum([FocalLoss(), LovaszHingeLoss()], weights=[1.0, -0.5]),
     "loss.weights must be finite and >= 0, got [1.0, -0.5]"),
    (lambda: WeightedLossSum([FocalLoss()], weights=[float("nan")]), "loss.weights must be finite and >= 0, got [nan]"),
    (lambda: WeightedLossSum([FocalLoss()], gamma=-1.0), "loss.gamma must be a finite number >= 0, got -1.0"),
    (lambda: WeightedLossSum([FocalLoss()], pos_weight=[0.0]),
     "loss.pos_weight must be finite and > 0 for every class"),
    (lambda: positive_class_weights(np.zeros(5)), "labels must be a 2-D (N, C) multi-hot matrix, got shape (5,)"),
    (lambda: positive_class_weights(np.zeros((2, 2)), power=-1), "power must be >= 0, got -1"),
    (lambda: positive_class_weights(np.zeros((2, 2)), max_weight=0.5), "max_weight must be >= 1, got 0.5"),
])
def test_bad_settings_are_refused_with_one_clear_message(build, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        build()
    assert str(raised.value) == message


@pytest.mark.parametrize(("loss", "logits", "targets", "message"), [
    (FocalLoss(), torch.zeros(2, 3), torch.zeros(2, 4), "logits (2, 3) and targets (2, 4) must have the same shape"),
    (FocalLoss(), torch.tensor(0.5), torch.tensor(1.0), "logits must have a class dimension"),
    (FocalLoss(2.0, [1.0] * 3), torch.zeros(2, 4), torch.zeros(2, 4),
     "loss.pos_weight has 3 entries but logits have 4 classes"),
    (LovaszHingeLoss(), torch.zeros(4, 7), torch.zeros(7, 4),
     "logits (4, 7) and targets (7, 4) must both be (batch, classes)"),
    (LovaszHingeLoss(), torch.zeros(7), torch.zeros(7), "logits (7,) and targets (7,) must both be (batch, classes)"),
    (LovaszHingeLoss(per_image=True), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4),
     "logits (2, 3, 4) and targets (2, 3, 4) must both be (batch, classes)"),
])
def test_bad_inputs_are_refused_with_one_clear_message(loss, logits, targets, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        loss(logits, targets)
    assert str(raised.value) == message


def test_boundary_settings_are_accepted() -> None:
    assert FocalLoss(gamma=0).gamma == 0.0  # gamma 0 is BCE, not refused
    assert FocalLoss(gamma="1.5").gamma == 1.5  # a number as a string from the command line
    np.testing.assert_array_equal(positive_class_weights(np.eye(3), power=0.0, max_weight=1.0), np.ones(3))
    total = WeightedLossSum([FocalLoss(), LovaszHingeLoss()], weights=[0, 2])
    assert total.weights == [0.0, 2.0] and all(isinstance(w, float) for w in total.weights)


def test_pos_weight_is_copied_to_float32_from_any_sequence() -> None:
    """A tensor (even float64, on the autograd graph), a numpy array or an OmegaConf list: stored as a float32 copy
    that later changes to the caller's object do not reach."""
    from omegaconf import OmegaConf

    source = torch.tensor([1.5, 2.5], dtype=torch.float64, requires_grad=True)
    from_tensor = FocalLoss(pos_weight=source).pos_weight
    assert from_tensor.dtype == torch.float32 and not from_tensor.requires_grad and from_tensor.tolist() == [1.5, 2.5]
    array = np.array([1.5, 2.5])
    from_array = FocalLoss(pos_weight=array).pos_weight
    array[0] = 9.0
    assert from_array.dtype == torch.float32 and from_array.tolist() == [1.5, 2.5]
    plain = torch.tensor([1.5, 2.5])
    from_float32 = FocalLoss(pos_weight=plain).pos_weight
    plain[0] = 9.0
    assert from_float32.tolist() == [1.5, 2.5]
    listed = FocalLoss(pos_weight=OmegaConf.create({"w": [1.5, 2.5]}).w).pos_weight
    assert listed.dtype == torch.float32 and listed.tolist() == [1.5, 2.5]


def test_a_sum_keeps_each_focal_terms_own_settings_unless_it_sets_them() -> None:
    """gamma / pos_weight given to the sum replace the focal terms' own; left out, each term keeps its own (before,
    a term's own pos_weight could be dropped unnoticed: only the sum's was tested)."""
    logits, targets = _batch(6, c=3)
    own = FocalLoss(gamma=0.5, pos_weight=[2.0, 3.0, 4.0])
    kept = WeightedLossSum([own, LovaszHingeLoss()], weights=[2.0, 0.5])
    assert kept.losses[0].gamma == 0.5 and kept.losses[0].pos_weight.tolist() == [2.0, 3.0, 4.0]
    expected = 2.0 * own(logits, targets) + 0.5 * LovaszHingeLoss()(logits, targets)
    torch.testing.assert_close(kept(logits, targets), expected, rtol=1e-12, atol=0)
    replaced = WeightedLossSum([own], gamma=0.0, pos_weight=[5.0, 6.0, 7.0])
    assert replaced.losses[0].gamma == 0.0 and replaced.losses[0].pos_weight.tolist() == [5.0, 6.0, 7.0]
    torch.testing.assert_close(replaced(logits, targets), F.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64)), rtol=1e-6, atol=0)
    assert own.gamma == 0.5 and own.pos_weight.tolist() == [2.0, 3.0, 4.0]  # the term given is not changed


def test_soft_labels_count_as_positive_above_one_half() -> None:
    labels = np.array([[0.7, 0.3], [0.2, 0.5], [0.0, 0.0], [0.0, 1.0]])  # class 0: 1 positive of 4, class 1: 1
    np.testing.assert_array_equal(positive_class_weights(labels, power=1.0), [3.0, 3.0])


def test_any_leading_shape_and_integer_or_bool_targets() -> None:
    """Class last: (classes,) for one sample, (batch, tiles, classes) alike; targets as the loader's uint8 or as
    bool give the float result."""
    logits, targets = _batch(8, n=6, c=4)
    weight = [1.0, 2.0, 3.0, 4.0]
    for loss in (FocalLoss(2.0, weight), bce_loss(weight), LovaszHingeLoss(), LovaszHingeLoss(per_image=True)):
        expected = loss(logits, targets)
        for typed in (targets.to(torch.uint8), targets.bool()):
            assert torch.equal(loss(logits, typed), expected)
    focal = FocalLoss(2.0, weight)
    torch.testing.assert_close(focal(logits[0], targets[0]), focal(logits[:1], targets[:1]), rtol=1e-12, atol=0)
    torch.testing.assert_close(focal(logits.reshape(2, 3, 4), targets.reshape(2, 3, 4)), focal(logits, targets),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError) as raised:
        FocalLoss(2.0, [1.0, 2.0, 3.0])(logits.reshape(2, 3, 4), targets.reshape(2, 3, 4))
    assert str(raised.value) == "loss.pos_weight has 3 entries but logits have 4 classes"


def test_pos_weight_follows_the_logits_device_and_dtype() -> None:
    """The buffer is moved to the logits' device (the meta device stands in for a GPU) and dtype, so the loss is in
    the logits' dtype even when the module was converted to another."""
    loss = FocalLoss(2.0, [1.0, 2.0, 3.0])
    on_meta = loss(torch.zeros(2, 3, device="meta"), torch.zeros(2, 3, device="meta"))
    assert on_meta.device.type == "meta" and loss.pos_weight.device.type == "cpu"
    weight = torch.tensor([0.1, 0.7, 2.9])  # not exact in float32: mixed-precision arithmetic would show
    logits, targets = _batch(4, c=3)
    in_float64 = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight.double())
    assert torch.equal(bce_loss(weight)(logits, targets), in_float64)  # float32 weights applied in float64
    doubled = bce_loss(weight).double()
    in_float32 = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=weight)
    got = doubled(logits.float(), targets.float())
    assert got.dtype == torch.float32 and torch.equal(got, in_float32)


def test_a_single_number_as_pos_weight_is_refused_with_the_message() -> None:
    with pytest.raises(ValueError) as raised:
        FocalLoss(pos_weight=2.0)
    assert str(raised.value) == ("loss.pos_weight must be a non-empty 1-D sequence of per-class weights, got shape ()")
    with pytest.raises(ValueError, match=r"^loss\.weights must be finite and >= 0, got \[inf\]$"):
        WeightedLossSum([FocalLoss()], weights=[float("inf")])
    array = np.array([1.5, 2.5], dtype=np.float32)
    stored = FocalLoss(pos_weight=array).pos_weight
    array[0] = 9.0
    assert stored.tolist() == [1.5, 2.5]
