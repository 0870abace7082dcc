"""The 4-channel stem rule on any first layer, pretrained-weight loading at any size and its errors, 4-channel weights,
the whole head, depth-wise parameter groups and layer-wise LR decay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from hpa_lightning.classes import CHANNELS
from hpa_lightning.errors import ConfigError, PretrainedUnavailable
from hpa_lightning.models.net import (
    build_network,
    check_image_size,
    check_pretrained_channels,
    create_model,
    image_size_arguments,
    rgb_stem_to_rgby,
)
from hpa_lightning.models.param_groups import head_parameter_names, parameter_groups
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


# ------------------------------------------------------------------ transformers, any size, any channel order


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_patch_embedding_gets_the_stem_rule_and_position_embeddings_are_resampled_for_the_size(
        tmp_path: Path) -> None:
    """The issue's failure (a 224 px ViT checkpoint at data.image_size=64): built at 64 px, the patch embedding
    widened by the poster's rule, the 14 x 14 position embeddings resampled to 4 x 4 as timm's own loader does."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    rgb = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=3)
    model = create_model("vit_tiny_patch16_224", pretrained=str(save_weights(rgb, tmp_path / "vit.safetensors")),
                         img_size=64)
    stem, source = model.patch_embed.proj.weight.detach(), rgb.patch_embed.proj.weight.detach()
    assert stem.shape == (192, 4, 16, 16)
    torch.testing.assert_close(stem[:, :3], source, rtol=0, atol=0)
    torch.testing.assert_close(stem[:, 3], source[:, 0], rtol=0, atol=0)
    expected = resample_abs_pos_embed(rgb.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert torch.equal(model.blocks[5].attn.qkv.weight, rgb.blocks[5].attn.qkv.weight)
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 4, 64, 64)).shape == (2, 28)


def test_windows_and_partitions_follow_the_size_as_timm_derives_them() -> None:
    """Swin's windows scale with the patch grid (the last stage one window, as 7 at 224 px), MaxViT's partitions
    too; CNNs take any size and get no size arguments."""
    assert image_size_arguments("swin_tiny_patch4_window7_224", 64) == {"img_size": (64, 64),
                                                                        "window_size": ((2, 2),) * 4}
    assert image_size_arguments("swin_tiny_patch4_window7_224", 512)["window_size"] == ((16, 16),) * 4
    assert image_size_arguments("maxvit_tiny_tf_224", 64)["transformer_window_size"] == (2, 2)
    assert image_size_arguments("vit_tiny_patch16_224", 64, dynamic_img_size=True) == {
        "img_size": (64, 64), "dynamic_img_size": True}
    assert image_size_arguments("resnet18", 64, dynamic_img_size=True) == {}


def test_four_channel_weights_are_reordered_not_widened(tmp_path: Path) -> None:
    """HPA-pretrained weights (SubCell: red, yellow, blue, green) already see the four channels: the first layer is
    put in the project's R, G, B, Y order; a fifth channel the project has not is left out."""
    torch.manual_seed(0)
    order = ["red", "yellow", "blue", "green"]
    hpa = timm.create_model("resnet18", pretrained=False, in_chans=4)
    model = create_model("resnet18", pretrained=str(save_weights(hpa, tmp_path / "subcell.safetensors")),
                         pretrained_channels=order)
    for i, channel in enumerate(CHANNELS):
        assert torch.equal(model.conv1.weight[:, i], hpa.conv1.weight[:, order.index(channel)]), channel
    assert torch.equal(model.layer2[0].conv1.weight, hpa.layer2[0].conv1.weight)
    five = ["blue", "green", "red", "yellow", "brightfield"]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=5)
    model = create_model("vit_tiny_patch16_224", pretrained=str(save_weights(vit, tmp_path / "five.safetensors")),
                         pretrained_channels=five, img_size=32)
    for i, channel in enumerate(CHANNELS):
        assert torch.equal(model.patch_embed.proj.weight[:, i], vit.patch_embed.proj.weight[:, five.index(channel)])


@pytest.mark.parametrize(("channels", "message"), [
    (["red", "green"], r"2 channels fit no rule: 3 \(red, green, blue: Y = R is added\) or 4 and more"),
    (["red", "yellow", "blue"], "3-channel weights must be red, green and blue"),
    (["red", "green", "blue", "blue"], "a channel named twice"),
    (["red", "green", "blue", "brightfield"], r"missing yellow"),
    ("red,green,blue", "expected a list of channel names"),
])
def test_channel_orders_that_fit_no_rule_are_one_line(channels: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        check_pretrained_channels(channels)
    assert str(raised.value).startswith("model.pretrained_channels") and "\n" not in str(raised.value)


def test_weights_whose_channel_count_is_not_named_are_one_line(tmp_path: Path) -> None:
    path = save_weights(timm.create_model("resnet18", pretrained=False, in_chans=4), tmp_path / "four.safetensors")
    with pytest.raises(ConfigError, match=r"conv1.weight\) takes 4 channels; name their order with "
                                          r"model.pretrained_channels"):
        create_model("resnet18", pretrained=str(path))
    with pytest.raises(ConfigError, match=r"has 3 names, the weights' first layer \(conv1.weight\) takes 4"):
        create_model("resnet18", pretrained=str(path), pretrained_channels=["blue", "green", "red"])


@pytest.mark.parametrize(("name", "size", "nearest", "why"), [
    ("maxvit_pico_rw_256", 72, 64, "must be divisible by window"),  # fixed window and grid partitions
    ("vit_tiny_patch16_224", 60, 64, "not a multiple of its 16 px patches"),
    ("vit_small_patch14_dinov2", 64, 70, "not a multiple of its 14 px patches"),
    ("inception_v3", 64, 80, "Kernel size can't be greater than actual input size"),
])
def test_a_size_an_architecture_cannot_run_at_is_one_line_with_the_nearest_that_works(
        name: str, size: int, nearest: int, why: str) -> None:
    with pytest.raises(ConfigError) as raised:
        check_image_size(name, size, "data.image_size")
    message = str(raised.value)
    assert message.startswith(f"model.name={name} cannot run at data.image_size={size} (") and why in message
    assert message.endswith(f"the nearest size that works is data.image_size={nearest}") and "\n" not in message


def test_names_tags_and_hub_sources_are_checked_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model.name=resnet18.nosuchtag: timm has no such pretrained tag \(it has"):
        create_model("resnet18.nosuchtag")
    with pytest.raises(ConfigError, match=r"name the architecture .* and the weights with "
                                          r"model.pretrained=hf-hub:timm/vit_tiny_patch16_224"):
        create_model("hf-hub:timm/vit_tiny_patch16_224")
    with pytest.raises(PretrainedUnavailable, match=r"cannot fetch pretrained weights for vit_tiny_patch16_224 .*"
                                                    r"\+preset=scratch"):
        create_model("vit_tiny_patch16_224", pretrained="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", img_size=32)


@pytest.mark.parametrize(("name", "kwargs", "head"), [
    ("convnext_atto", {}, {"head.norm", "head.fc"}),  # head.norm: outside get_classifier()
    ("vit_tiny_patch16_224", {"global_pool": "avg", "img_size": 32}, {"fc_norm", "head"}),  # MAE-style pooling
    ("deit_tiny_distilled_patch16_224", {"img_size": 32}, {"head", "head_dist"}),
    ("densenet121", {}, {"classifier"}),  # features.norm5 is the body's last layer, whatever timm's matcher says
    ("caformer_s18", {}, {"head.norm", "head.fc.fc1", "head.fc.norm", "head.fc.fc2"}),  # no group matcher
    ("maxvit_tiny_tf_224", {"img_size": 64}, {"head.norm", "head.pre_logits.fc", "head.fc"}),
])
def test_the_head_is_everything_forward_head_runs_and_the_last_lr_group(name: str, kwargs: dict,
                                                                         head: set[str]) -> None:
    with torch.device("meta"):  # the structure is all this needs
        model = build_network(name, 28, **kwargs)
    expected = {f"{m}.{w}" for m in head for w in ("weight", "bias")}
    assert head_parameter_names(model) == expected
    groups = parameter_groups(model, lr=0.1)
    assert {n for g in groups if g["name"].startswith("head") for n, p in model.named_parameters()
            if any(p is q for q in g["params"])} == expected
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_layer_decay_gives_each_layer_the_next_ones_lr_times_the_factor() -> None:
    from hpa_lightning.training.callbacks import group_lrs

    model = build_network("vit_tiny_patch16_224", 28, img_size=32)
    groups = parameter_groups(model, lr=0.01, layer_decay=0.75, weight_decay=0.05)
    lrs = group_lrs(torch.optim.AdamW(groups))  # what the LR trace records: each layer once, by name
    assert list(lrs) == ["stem", *[f"blocks.{i}" for i in range(11)], "blocks.11+norm", "head"]
    values = np.array(list(lrs.values()))
    np.testing.assert_allclose(values[:-1] / values[1:], 0.75)
    assert values[-1] == pytest.approx(0.01) and values[0] == pytest.approx(0.01 * 0.75 ** 13)
    by_name = {g["name"]: g for g in groups}
    ids = {id(p) for p in by_name["stem_no_decay"]["params"]}
    assert id(model.pos_embed) in ids and id(model.cls_token) in ids  # timm's no_weight_decay list
    assert [p is model.patch_embed.proj.weight for p in by_name["stem"]["params"]] == [True]
    assert by_name["stem"]["weight_decay"] == 0.05 and by_name["stem_no_decay"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
