"""Device-side augmentation: the pipeline is the config's list of steps (kornia's or the user's own modules), a step
that cannot take the four channels is refused at start-up, old checkpoints keep loading, the 90-degree turns are
uniform and exact, geometry is shared by the four channels."""

from __future__ import annotations

import random
import sys
from collections import OrderedDict
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from hpa_lightning.errors import ConfigError, UserError
from hpa_lightning.models.augment import (
    LEGACY_AUGMENT_DEFAULTS,
    Augmentation,
    DeviceTransform,
    RandomRot90,
    build_augmentation,
    check_crop,
    legacy_augment_steps,
)
from hpa_lightning.runs.outputs import plain
from tests.conftest import compose_config

POSTER = [("rot90", "RandomRot90", None, {}),
          ("rotation", "RandomRotation", 0.5, {"_param_generator.degrees": [-10.0, 10.0]}),
          ("hflip", "RandomHorizontalFlip", 0.5, {}),
          ("vflip", "RandomVerticalFlip", 0.5, {}),
          ("brightness", "RandomBrightness", 0.5, {"_param_generator.brightness_factor": [0.9, 1.1]}),
          ("contrast", "RandomContrast", 0.5, {"_param_generator.contrast_factor": [0.9, 1.1]})]


def describe(augment: nn.Module) -> list[tuple[str, str, float | None, dict[str, list[float]]]]:
    """(name, class, p, sampling ranges) of each step, in the order they run; kornia keeps its ranges in buffers."""
    return [(name, type(step).__name__, getattr(step, "p", None),
             {key: [round(v, 6) for v in buffer.tolist()] for key, buffer in step.named_buffers()})
            for name, step in augment.named_children()]


def augment_of(overrides: list[str]) -> Augmentation:
    return build_augmentation(plain(compose_config(overrides).augment))


def raised_line(steps: object) -> str:
    with pytest.raises(ConfigError) as raised:
        build_augmentation(steps)
    assert isinstance(raised.value, UserError)  # the entry points print it as `error: ...` and exit 2
    message = str(raised.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------ the pipeline from the config


def test_default_config_is_the_posters_pipeline_in_order() -> None:
    augment = augment_of([])
    assert describe(augment) == POSTER
    assert isinstance(augment.rot90, RandomRot90)
    torch.manual_seed(0)
    x = torch.rand(3, 4, 32, 32)
    out = augment(x)
    assert out.shape == x.shape and not torch.equal(out, x)


def test_steps_are_removed_tuned_and_added_from_the_command_line() -> None:
    augment = augment_of(["~augment.hflip", "augment.vflip.p=0.2",
                          "+augment.blur={_target_: kornia.augmentation.RandomGaussianBlur, kernel_size: [3, 3], "
                          "sigma: [0.1, 1.0], p: 0.2}"])
    assert [name for name, *_ in describe(augment)] == ["rot90", "rotation", "vflip", "brightness", "contrast", "blur"]
    assert augment.vflip.p == pytest.approx(0.2)
    assert isinstance(augment.blur, K.RandomGaussianBlur) and augment.blur.p == pytest.approx(0.2)
    assert describe(augment_of(["augment.rotation=null"]))[1][0] == "hflip"  # a null node is a step switched off


def test_no_augmentation_and_a_pipeline_of_ones_own() -> None:
    assert len(augment_of(["augment=none"])) == 0
    assert len(build_augmentation(None)) == 0
    x = torch.rand(2, 4, 16, 16)
    assert torch.equal(DeviceTransform([0.0] * 4, [1.0] * 4, augment=None)(x, train=True), x)
    only = augment_of(["augment=none", "+augment.flip={_target_: kornia.augmentation.RandomVerticalFlip, p: 1.0}"])
    assert describe(only) == [("flip", "RandomVerticalFlip", 1.0, {})]
    torch.testing.assert_close(only(x), x.flip(-2), rtol=0, atol=0)


def test_a_plain_list_of_steps_runs_in_the_order_given() -> None:
    steps = [{"_target_": "kornia.augmentation.RandomHorizontalFlip", "p": 1.0},
             {"_target_": "kornia.augmentation.RandomVerticalFlip", "p": 1.0},
             {"_target_": "hpa_lightning.models.augment.RandomRot90"}]
    augment = build_augmentation(steps)
    assert [kind for _, kind, *_ in describe(augment)] == ["RandomHorizontalFlip", "RandomVerticalFlip", "RandomRot90"]
    augment = build_augmentation(steps[:2])
    x = torch.rand(2, 4, 8, 8)
    torch.testing.assert_close(augment(x), x.flip(-1).flip(-2), rtol=0, atol=0)
    bad = [steps[0], {"_target_": "collections.OrderedDict"}]
    assert raised_line(bad).startswith("augment[1] (collections.OrderedDict)")


def test_a_users_own_module_outside_the_package_is_built_and_applied(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hpa_test_myaug.py").write_text(
        "import torch\n"
        "from torch import nn\n\n\n"
        "class AddNoise(nn.Module):\n"
        "    def __init__(self, sigma: float):\n"
        "        super().__init__()\n"
        "        self.sigma = sigma\n\n"
        "    def forward(self, x):\n"
        "        return x + self.sigma * torch.randn_like(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hpa_test_myaug", raising=False)
    overrides = ["+augment.noise={_target_: hpa_test_myaug.AddNoise, sigma: 0.5}"]
    transform = DeviceTransform([0.0] * 4, [1.0] * 4, augment=plain(compose_config(overrides).augment))
    noise = transform.augment.noise
    assert type(noise).__module__ == "hpa_test_myaug" and noise.sigma == 0.5
    assert list(transform.augment.named_children())[-1][0] == "noise"  # added steps run last
    x = torch.full((64, 4, 16, 16), 0.5)
    transform.augment = Augmentation(OrderedDict(noise=noise))  # the noise alone, to measure it
    out = transform(x, train=True)
    assert (out - x).std().item() == pytest.approx(0.5, rel=0.05)
    assert torch.equal(transform(x, train=False), x)  # augmentation is for training only
    monkeypatch.delitem(sys.modules, "hpa_test_myaug")


# ------------------------------------------------------------------------------ refused at start-up, in one line


@pytest.mark.parametrize("target", ["kornia.augmentation.ColorJitter", "kornia.augmentation.ColorJiggle"])
def test_a_transform_that_cannot_take_four_channels_is_refused(target: str) -> None:
    node = f"{{_target_: {target}, brightness: 0.1, contrast: 0.1, saturation: 0.1, hue: 0.05, p: 0.1}}"
    with pytest.raises(ConfigError) as raised:
        augment_of([f"+augment.color={node}"])
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"augment.color ({target}) cannot take")
    assert "4 channels" in message


class ThreeChannelsOnly(K.IntensityAugmentationBase2D):
    """A kornia transform whose arithmetic needs RGB: it only fails when its draw picks a sample."""

    def apply_transform(self, input, params, flags, transform=None):  # noqa: A002 - kornia's signature
        if input.shape[1] != 3:
            raise ValueError(f"expected 3 channels, got {input.shape[1]}")
        return input


def test_a_rarely_applied_transform_is_probed_as_if_always_applied() -> None:
    p = K.RandomHorizontalFlip(p=0.01)
    assert raised_line({"rgb": {"_target_": "tests.models.test_augment.ThreeChannelsOnly", "p": 0.001}}).startswith(
        "augment.rgb (tests.models.test_augment.ThreeChannelsOnly) cannot take")
    assert p.p == 0.01  # the probe's p = 1 is undone
    augment = build_augmentation({"flip": {"_target_": "kornia.augmentation.RandomHorizontalFlip", "p": 0.01}})
    assert augment.flip.p == 0.01 and augment.flip.p_batch == 1.0


@pytest.mark.parametrize(("node", "expected"), [
    ({"_target_": "collections.OrderedDict"}, "augment.x (collections.OrderedDict): an augmentation must be a "
                                              "torch.nn.Module"),
    ({"_target_": "hpa_no_such_module.Aug"}, "augment.x (hpa_no_such_module.Aug): _target_ does not import"),
    ({"_target_": "kornia.augmentation.NoSuchFlip"}, "augment.x (kornia.augmentation.NoSuchFlip): _target_ does "
                                                     "not import"),
    ({"_target_": "kornia.augmentation.RandomHorizontalFlip", "q": 1}, "augment.x (kornia.augmentation."
                                                                       "RandomHorizontalFlip): could not be built"),
    ({"_target_": "torch.nn.Conv2d", "in_channels": 4, "out_channels": 3, "kernel_size": 1},
     "augment.x (torch.nn.Conv2d) must return the float (batch, 4, H, W) batch"),
    (0.5, "augment.x: expected a node with a _target_"),
])
def test_a_bad_step_is_refused_naming_its_key_and_target(node: object, expected: str) -> None:
    assert raised_line({"x": node}).startswith(expected)


class DrawsFromEveryStream(nn.Module):
    """A user's step that draws from Python's, NumPy's and torch's global generators."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + 0.0 * random.random() * np.random.rand()) + 0.0 * torch.rand(1)


def test_probing_leaves_every_global_random_stream_unchanged() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    augment = augment_of(["+augment.affine={_target_: kornia.augmentation.RandomAffine, degrees: 30}",
                          "+augment.mine={_target_: tests.models.test_augment.DrawsFromEveryStream}"])
    assert isinstance(augment.mine, DrawsFromEveryStream)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


# ------------------------------------------------------------------------------ checkpoints of the old form


def old_layout(rot90: bool = True, rotation_degrees: float = 10.0, hflip: float = 0.5, vflip: float = 0.5,
               brightness: float = 0.1, contrast: float = 0.1, p_lighting: float = 0.5) -> nn.Module:
    """What the old `build_augmentation(**kwargs)` built, for its state dict (kornia's ranges are buffers)."""
    ops = [K.RandomRotation(degrees=rotation_degrees, p=0.5), K.RandomHorizontalFlip(p=hflip),
           K.RandomVerticalFlip(p=vflip), K.RandomBrightness(brightness=(1 - brightness, 1 + brightness), p=p_lighting),
           K.RandomContrast(contrast=(1 - contrast, 1 + contrast), p=p_lighting)]
    return nn.Sequential(*([RandomRot90()] if rot90 else []), K.AugmentationSequential(*ops, data_keys=["input"]))


def test_old_keyword_arguments_build_the_same_steps_as_the_config() -> None:
    assert legacy_augment_steps(LEGACY_AUGMENT_DEFAULTS) == plain(compose_config().augment)
    assert describe(DeviceTransform([0.0] * 4, [1.0] * 4, augment=dict(LEGACY_AUGMENT_DEFAULTS)).augment) == POSTER
    old = {"rot90": False, "rotation_degrees": 5.0, "hflip": 0.0, "vflip": 0.3, "brightness": 0.2, "contrast": 0.0,
           "p_lighting": 0.25}
    assert describe(DeviceTransform([0.0] * 4, [1.0] * 4, augment=old).augment) == [
        ("rotation", "RandomRotation", 0.5, {"_param_generator.degrees": [-5.0, 5.0]}),
        ("vflip", "RandomVerticalFlip", 0.3, {}),
        ("brightness", "RandomBrightness", 0.25, {"_param_generator.brightness_factor": [0.8, 1.2]})]


def test_checkpoints_of_either_form_load(tmp_path: Path) -> None:
    """A checkpoint written before the steps were named holds the old kwargs and the old pipeline's buffers in its
    state dict; one written now holds the steps and no augmentation state at all (the config defines it)."""
    from hpa_lightning.models.module import HPAModule

    args = {"model": {"name": "resnet10t", "pretrained": False},
            "loss": {"_target_": "hpa_lightning.models.losses.FocalLoss", "gamma": 0.2},
            "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}}
    module = HPAModule(**args, augment=plain(compose_config().augment))
    assert not [key for key in module.state_dict() if key.startswith("transform.augment.")]
    new = tmp_path / "new.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "pytorch-lightning_version": "2.6.6"}, new)
    # the kornia names are allowlisted
    assert describe(HPAModule.load_from_checkpoint(new, map_location="cpu").transform.augment) == POSTER

    old_state = {**module.state_dict(),
                 **{f"transform.augment.{key}": value for key, value in old_layout().state_dict().items()}}
    assert "transform.augment.1.RandomRotation_0._param_generator.degrees" in old_state
    old = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {**dict(module.hparams), "augment": dict(LEGACY_AUGMENT_DEFAULTS)},
                "state_dict": old_state, "pytorch-lightning_version": "2.6.6"}, old)
    loaded = HPAModule.load_from_checkpoint(old, map_location="cpu")
    assert describe(loaded.transform.augment) == POSTER
    assert torch.equal(loaded.state_dict()["net.fc.weight"], module.state_dict()["net.fc.weight"])


# ------------------------------------------------------------------------------ exact quarter turns


def marked_batch(n: int, size: int = 8) -> torch.Tensor:
    x = torch.zeros(n, 4, size, size)
    x[:, :, 0, 0] = 1.0  # one bright corner: where it ends up tells the rotation
    return x


def turns_applied(out: torch.Tensor) -> np.ndarray:
    """0/1/2/3 quarter turns (counter-clockwise, torch.rot90's sense) from the marker's corner; -1 if none."""
    size = out.shape[-1] - 1
    corners = {(0, 0): 0, (size, 0): 1, (size, size): 2, (0, size): 3}
    result = np.full(len(out), -1)
    for (row, col), k in corners.items():
        result[(out[:, :, row, col] == 1.0).all(dim=1).numpy()] = k
    return result


def test_quarter_turns_are_uniform_and_exact() -> None:
    torch.manual_seed(0)
    augment = build_augmentation({"rot90": {"_target_": "hpa_lightning.models.augment.RandomRot90"}})
    x = marked_batch(4000)
    out = augment(x)
    turns = turns_applied(out)
    assert (turns >= 0).all()  # an exact permutation of the pixels: the marker stays 1.0 in a corner, all channels
    assert out.sum().item() == x.sum().item()
    counts = np.bincount(turns, minlength=4)
    # kornia's RandomRotation90(times=(0, 3)) gives about 667/1333/1333/667 here: p < 1e-100
    assert chisquare(counts).pvalue > 1e-3, counts
    assert counts.min() > 850, counts


def test_quarter_turns_are_torch_rot90_of_each_sample_never_a_reflection() -> None:
    """An asymmetric image tells a turn from a reflection (a corner marker cannot): every sample is exactly
    torch.rot90 of its input by some k, and all four k occur."""
    x = torch.arange(64 * 4 * 5 * 5, dtype=torch.float32).view(64, 4, 5, 5)
    torch.manual_seed(3)
    out = RandomRot90()(x)
    found = []
    for sample, turned in zip(x, out, strict=True):
        matches = [k for k in range(4) if torch.equal(turned, torch.rot90(sample, k, dims=(-2, -1)))]
        assert len(matches) == 1
        found += matches
    assert set(found) == {0, 1, 2, 3}


# ------------------------------------------------------------------------------ crops from a higher resolution


def window_of(crop: torch.Tensor, image: torch.Tensor) -> list[tuple[int, int]]:
    """Every (top, left) where `crop` is exactly a window of `image` (all four channels), by brute force."""
    size, full = crop.shape[-1], image.shape[-1]
    return [(t, left) for t in range(full - size + 1) for left in range(full - size + 1)
            if torch.equal(image[:, t:t + size, left:left + size], crop)]


def test_training_crops_are_random_windows_shared_by_the_channels() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 4, 20, 20)  # distinct values: a window is found at one place only
    transform = DeviceTransform([0.0] * 4, [1.0] * 4, augment=None, crop={"size": 12, "eval": "full"})
    out = transform(x, train=True)
    assert out.shape == (64, 4, 12, 12)
    corners = [window_of(out[i], x[i]) for i in range(64)]
    assert all(len(found) == 1 for found in corners)  # a plain window, the same for R, G, B and Y
    positions = {found[0] for found in corners}
    assert len(positions) > 20  # drawn per sample, over the 81 possible windows


def test_evaluation_sees_the_full_image_or_its_centre() -> None:
    x = torch.rand(3, 4, 21, 21)
    full = DeviceTransform([0.0] * 4, [1.0] * 4, crop={"size": 12, "eval": "full"})(x, train=False)
    torch.testing.assert_close(full, x, rtol=0, atol=0)
    centre = DeviceTransform([0.0] * 4, [1.0] * 4, crop={"size": 12, "eval": "center"})(x, train=False)
    torch.testing.assert_close(centre, x[..., 4:16, 4:16], rtol=0, atol=0)
    assert all(window_of(centre[i], x[i]) == [(4, 4)] for i in range(3))


def test_crop_settings_are_checked_in_one_line() -> None:
    assert check_crop(None) == (None, "full")
    for crop, image_size, message in [({"size": 4}, None, "crop.size=4: expected a whole number of pixels >= 8"),
                                      ({"size": 64}, 48, "crop.size=64 is larger than the packed images"),
                                      ({"size": 32, "eval": "middle"}, None, "crop.eval='middle': expected one of")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            check_crop(crop, image_size)
