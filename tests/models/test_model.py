"""The 4-channel stem rule, pretrained-weight loading and its errors, depth-wise parameter groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from hpa_lightning.errors import ConfigError, PretrainedUnavailable
from hpa_lightning.models.net import create_model, parameter_groups, rgb_stem_to_rgby
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def rgb_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, in_chans=3, num_classes=1000)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_stem_rule_rgb_kept_and_y_from_r(rgb_resnet18: torch.nn.Module, tmp_path: Path, suffix: str) -> None:
    state = rgb_resnet18.state_dict()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    model = create_model("resnet18", pretrained=str(path))
    stem = model.conv1.weight.detach()
    source = state["conv1.weight"]
    assert stem.shape == (64, 4, 7, 7)
    torch.testing.assert_close(stem[:, :3], source, rtol=0, atol=0)  # R, G, B unchanged, not rescaled
    torch.testing.assert_close(stem[:, 3], source[:, 0], rtol=0, atol=0)  # Y = R
    torch.testing.assert_close(model.layer3[0].conv1.weight, state["layer3.0.conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.bn1.running_mean, state["bn1.running_mean"])
    assert model.fc.weight.shape == (28, 512)  # a fresh 28-way head


def test_rgb_stem_to_rgby_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="3-channel"):
        rgb_stem_to_rgby(torch.zeros(8, 4, 3, 3))


def test_unavailable_pretrained_weights_name_both_remedies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedUnavailable) as info:
        create_model("resnet18", pretrained=True)
    message = str(info.value)
    assert "model.pretrained=/path/to/resnet18.safetensors" in message and "model.pretrained=false" in message


def test_missing_weight_file(tmp_path: Path) -> None:
    with pytest.raises(PretrainedUnavailable, match="nothere.pth: file not found"):
        create_model("resnet18", pretrained=str(tmp_path / "nothere.pth"))


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(PretrainedUnavailable, match="do not fit timm's resnet18"):
        create_model("resnet18", pretrained=str(tmp_path / "r34.pth"))


def test_scratch_model_has_four_input_channels() -> None:
    model = create_model("resnet18", pretrained=False)
    assert model.conv1.in_channels == 4


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_parameter_groups_rise_toward_the_head(name: str) -> None:
    model = create_model(name, pretrained=False)
    groups = parameter_groups(model, lr=0.09, lr_ratios=(1 / 9, 1 / 3, 1.0), weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"early", "early_no_decay", "late", "late_no_decay", "head", "head_no_decay"}
    assert by_name["early"]["lr"] == pytest.approx(0.01)
    assert by_name["late"]["lr"] == pytest.approx(0.03)
    assert by_name["head"]["lr"] == pytest.approx(0.09)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # every parameter exactly once
    for group in groups:
        decays = group["name"].endswith("_no_decay")
        assert group["weight_decay"] == (0.0 if decays else 1e-4)
        assert all((p.ndim <= 1) == decays for p in group["params"])
    assert any(p is model.conv1.weight for p in by_name["early"]["params"])
    assert any(p is model.layer1[0].conv1.weight for p in by_name["early"]["params"])
    assert any(p is model.layer4[0].conv1.weight for p in by_name["late"]["params"])
    assert [p is model.fc.weight for p in by_name["head"]["params"]] == [True]


# ------------------------------------------------------------------ the winners' backbones and global pooling


BACKBONES = ["densenet121", "efficientnet_b0", "inception_v3", "seresnext50_32x4d"]


def module_of(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    return model.get_submodule(dotted)


@pytest.mark.parametrize("model_config", BACKBONES)
def test_each_backbone_config_gets_the_stem_rule_and_its_lr_groups(tmp_path: Path, model_config: str) -> None:
    """From the real config group: a local 3-channel weight file (made here) loads with that architecture's own first
    convolution widened (R, G, B kept, Y = R), every other body weight unchanged, a new 28-way head, and three LR
    groups from timm's group matcher with the head alone in the last."""
    cfg = compose_config([f"model={model_config}"])
    name, global_pool = cfg.model.name, cfg.model.global_pool
    torch.manual_seed(0)
    rgb = timm.create_model(name, pretrained=False, in_chans=3, num_classes=1000)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(path))
    model = create_model(name, pretrained=str(path), global_pool=global_pool)
    first_conv = rgb.pretrained_cfg["first_conv"]
    source, stem = module_of(rgb, first_conv).weight.detach(), module_of(model, first_conv).weight.detach()
    assert stem.shape[1] == 4 and source.shape[1] == 3
    torch.testing.assert_close(stem[:, :3], source, rtol=0, atol=0)
    torch.testing.assert_close(stem[:, 3], source[:, 0], rtol=0, atol=0)
    classifier = rgb.pretrained_cfg["classifier"]
    body = {k: v for k, v in rgb.state_dict().items() if not k.startswith(f"{classifier}.") and
            k != f"{first_conv}.weight"}
    mine = model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in body.items())
    assert model.get_classifier().out_features == 28
    if global_pool == "catavgmax":  # bestfitting's head: average and max pooled features side by side
        assert model.get_classifier().in_features == 2 * rgb.get_classifier().in_features
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 4, 80, 80)).shape == (2, 28)
    groups = parameter_groups(model, lr=0.1, weight_decay=1e-4)
    assert [g["name"] for g in groups if not g["name"].endswith("_no_decay")] == ["early", "late", "head"]
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    assert {id(p) for g in groups if g["name"].startswith("head") for p in g["params"]} == head_ids
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_an_unknown_architecture_or_pooling_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"model.name='resnet5o': not a timm architecture") as raised:
        create_model("resnet5o")
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"model.global_pool='median'") as raised:
        create_model("resnet10t", global_pool="median")
    assert "\n" not in str(raised.value)


def test_any_timm_name_works_with_the_stem_rule(tmp_path: Path) -> None:
    """A name without a config of its own (resnet34): `model.name=resnet34` is all it takes."""
    torch.manual_seed(0)
    rgb = timm.create_model("resnet34", pretrained=False, in_chans=3)
    torch.save(rgb.state_dict(), tmp_path / "r34.pth")
    cfg = compose_config(["model.name=resnet34", f"model.pretrained={tmp_path / 'r34.pth'}"])
    model = instantiate(cfg.model, num_classes=7)  # the node is the factory's arguments, nothing stripped
    assert torch.equal(model.conv1.weight[:, 3], rgb.conv1.weight[:, 0]) and model.get_classifier().out_features == 7
