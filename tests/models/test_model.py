"""The 4-channel stem rule, pretrained-weight loading and its errors, depth-wise parameter groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from hpa_lightning.errors import PretrainedUnavailable
from hpa_lightning.models.net import create_model, parameter_groups, rgb_stem_to_rgby


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
    model, loaded = create_model("resnet18", pretrained=str(path))
    assert loaded
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


def test_scratch_model_reports_not_pretrained() -> None:
    model, loaded = create_model("resnet18", pretrained=False)
    assert not loaded and model.conv1.in_channels == 4


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_parameter_groups_rise_toward_the_head(name: str) -> None:
    model, _ = create_model(name, pretrained=False)
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
