"""Class activation maps: CAM and Grad-CAM held to their defining identities, a nucleus-only class lighting up the
nuclei the generator drew, and the explain CLI's PNGs and HTML page."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from hpa_lightning.classes import CLASS_NAMES
from hpa_lightning.data.simulator import generate, render_sample
from hpa_lightning.explain import main as explain_main
from hpa_lightning.models.class_maps import class_maps, raw_class_maps
from hpa_lightning.models.module import HPAModule


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, in_chans=4, num_classes=28).eval()


def test_cam_of_an_average_pooled_linear_head_decomposes_the_logits(net: nn.Module) -> None:
    """Spatial mean of class c's CAM + bias_c = logit_c (Zhou et al.), the identity that makes CAM exact."""
    x = torch.randn(2, 4, 64, 64)
    classes = torch.tensor([[0, 5, 25], [3, 14, 27]])
    raw, method = raw_class_maps(net, x, classes)
    assert method == "cam" and raw.shape == (2, 3, 2, 2)
    with torch.no_grad():
        logits = net(x)
    expected = logits.gather(1, classes)
    torch.testing.assert_close(raw.mean(dim=(2, 3)) + net.get_classifier().bias[classes], expected, atol=1e-5, rtol=0)


def test_gradcam_of_such_a_head_is_the_positive_part_of_cam(net: nn.Module) -> None:
    """With average pooling the logit's gradient is W[c] / (h w) everywhere, so Grad-CAM = ReLU(CAM) / (h w)."""
    x = torch.randn(2, 4, 64, 64)
    classes = torch.tensor([[1, 2], [7, 0]])
    cam, _ = class_maps(net, x, classes, "cam")
    gradcam, method = class_maps(net, x, classes, "gradcam")
    assert method == "gradcam" and cam.shape == (2, 2, 64, 64)
    np.testing.assert_allclose(gradcam, cam, atol=1e-5)
    raw_cam, _ = raw_class_maps(net, x, classes, "cam")
    raw_grad, _ = raw_class_maps(net, x, classes, "gradcam")
    torch.testing.assert_close(raw_grad, torch.relu(raw_cam) / 4, atol=1e-5, rtol=0)


def test_other_heads_get_gradcam() -> None:
    pooled = timm.create_model("resnet10t", pretrained=False, in_chans=4, num_classes=28,
                               global_pool="catavgmax").eval()
    maps, method = class_maps(pooled, torch.randn(1, 4, 64, 64), torch.tensor([[3]]))
    assert method == "gradcam" and np.isfinite(maps).all() and maps.max() <= 1.0
    with pytest.raises(ValueError, match="method=cam needs a linear classifier after average pooling"):
        raw_class_maps(pooled, torch.randn(1, 4, 64, 64), torch.tensor([[3]]), "cam")


class GreenAt4xCoarser(nn.Module):
    """A network whose every logit is the mean green signal, seen through 4x4-pooled features: where its maps light
    up is where the green protein is, at a quarter of the image's resolution."""

    def __init__(self):
        super().__init__()
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.fc = nn.Linear(1, 28)
        nn.init.ones_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x[:, 1:2], 4)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.global_pool(features))


@pytest.mark.parametrize(("label", "inside"), [(0, True), (25, False)])
def test_a_nucleus_class_lights_up_the_nuclei_and_a_cytosol_class_does_not(label: int, inside: bool) -> None:
    """Same rng: the generator draws identical nuclei (blue) for both; nucleoplasm's green is drawn only inside them,
    cytosol's only outside. The upsampled maps must land where the generator drew."""
    image = render_sample([label], 128, np.random.default_rng(5), zoom=1.0)
    nuclei = image[2] > 0.3 * image[2].max()
    x = torch.from_numpy(image[None].astype(np.float32) / 255.0)
    for method in ("cam", "gradcam"):
        maps, _ = class_maps(GreenAt4xCoarser(), x, torch.tensor([[label]]), method)
        heat = maps[0, 0]
        ratio = heat[nuclei].mean() / max(heat[~nuclei].mean(), 1e-9)
        assert (ratio > 5) if inside else (ratio < 0.5), (method, ratio)


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("explain")
    images = generate(root / "kaggle", n=4, seed=3, size=48, workers=1)
    (images / "train").rename(images / "test")
    (images / "train.csv").unlink()
    run_dir = root / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    module = HPAModule(model={"name": "resnet10t", "pretrained": False},
                       loss={"_target_": "hpa_lightning.models.losses.FocalLoss", "name": "focal", "gamma": 0.2},
                       optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.02})
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, ckpt)
    (run_dir / "results.json").write_text(json.dumps({"status": "completed", "image_size": 32,
                                                      "best_checkpoint": str(ckpt)}))
    return run_dir, images


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_explain_writes_a_page_of_maps(run_and_images: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    run_dir, images = run_and_images
    out = tmp_path / "maps"
    explain_main([f"ckpt={run_dir}", f"input={images}", "classes=top2", f"out={out}", "device=cpu"])
    assert f"open {out / 'index.html'}" in capsys.readouterr().out
    page = Images()
    page.feed((out / "index.html").read_text())
    assert len(page.sources) == 4 * 3  # per image: the composite and two class maps
    assert all((out / src).is_file() for src in page.sources)
    assert sorted(p.name for p in out.iterdir()) == sorted({*page.sources, "index.html"})
    assert any(name in (out / "index.html").read_text() for name in CLASS_NAMES)


@pytest.mark.parametrize(("args", "message"), [
    (["ids=nope"], "ids=nope: nope not found"),
    (["classes=top0"], "classes=top0: expected predicted, topK"),
    (["method=shap"], "method=shap: expected one of auto, cam, gradcam"),
])
def test_bad_explain_input_is_one_line_and_writes_nothing(run_and_images: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture, args: list[str],
                                                          message: str) -> None:
    run_dir, images = run_and_images
    with pytest.raises(SystemExit) as exit_:
        explain_main([f"ckpt={run_dir}", f"input={images}", f"out={tmp_path / 'maps'}", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "maps").exists() and list(tmp_path.iterdir()) == []
