"""Every backbone family, CNNs and transformers, through the whole life of a model: 3-channel "pretrained" weights
saved at the architecture's own size (made here: no model hub), built at a non-native size with the poster's rule on
its first layer, two training epochs (the frozen first stage, then everything) with the architecture's whole head
trained and in the head's LR group, a checkpoint, predict, export, and predict from the export with the same
probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from hpa_lightning.classes import CLASS_NAMES
from hpa_lightning.inference.export_folder import export_model
from hpa_lightning.inference.predictor import run as predict_run
from hpa_lightning.models.module import HPAModule
from hpa_lightning.models.net import first_layers
from hpa_lightning.predict import DEFAULTS
from hpa_lightning.runs.outputs import plain
from hpa_lightning.training.callbacks import FreezeBackbone, LRTrace
from hpa_lightning.training.job import resolve_finetune, resolve_model
from tests.conftest import compose_config, write_kaggle_folder

LOSS = {"_target_": "hpa_lightning.models.losses.FocalLoss", "gamma": 0.2}


def weights(*modules: str) -> set[str]:
    return {f"{m}.{w}" for m in modules for w in ("weight", "bias")}


# name, packed image size (not the architecture's own: 224, or 518 for DINOv2), training crop, the whole head as the
# architecture defines it (everything forward_head runs), and whether the family is a heavy one for the CPU suite
FAMILIES = [
    pytest.param("resnet18", 64, None, weights("fc"), id="resnet"),
    pytest.param("densenet121", 64, None, weights("classifier"), id="densenet", marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", 64, None, weights("classifier"), id="efficientnet"),
    pytest.param("convnext_atto", 64, None, weights("head.norm", "head.fc"), id="convnext"),
    # trained on 48 px crops, evaluated on the full 64 px images: dynamic image size
    pytest.param("vit_tiny_patch16_224", 64, 48, weights("head"), id="vit"),
    pytest.param("deit_tiny_patch16_224", 64, None, weights("head"), id="deit"),
    pytest.param("swin_tiny_patch4_window7_224", 64, None, weights("head.fc"), id="swin", marks=pytest.mark.slow),
    pytest.param("eva02_tiny_patch14_224", 56, None, weights("fc_norm", "head"), id="eva02"),
    pytest.param("vit_small_patch14_reg4_dinov2.lvd142m", 56, None, weights("head"), id="dinov2",  # tagged name
                 marks=pytest.mark.slow),
    # the smallest MaxViT (7.5M parameters; its final norm ends forward_features); the tf variants' NormMlp head
    # (head.norm, head.pre_logits) is checked on the meta device in test_model.py
    pytest.param("maxvit_pico_rw_256", 64, None, weights("head.fc"), id="maxvit", marks=pytest.mark.slow),
]


@pytest.fixture(autouse=True)
def quick_weight_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each family builds its network seven times (the weight file, the pretrained source, the 4-channel model, three
    rebuilds for predict and export, timm's own from the card), and timm's truncated normal (uniform + erfinv)
    dominates the CPU time of a transformer's build; the random values are not under test: a clamped normal here."""
    import timm.layers.weight_init

    monkeypatch.setattr(timm.layers.weight_init, "_trunc_normal_",
                        lambda tensor, mean, std, a, b: tensor.normal_(mean, std).clamp_(a, b))


class RandomRGBY(Dataset):
    def __init__(self, size: int, n: int = 4):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 4, size, size), dtype=torch.uint8, generator=generator)
        self.targets = (torch.rand(n, len(CLASS_NAMES), generator=generator) < 0.2).float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "target": self.targets[i], "index": torch.tensor(i)}


class Snapshots(L.Callback):
    def __init__(self):
        self.after_epoch: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: HPAModule) -> None:
        self.after_epoch.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def predicted(source: Path, images: Path, out: Path) -> np.ndarray:
    predict_run({**DEFAULTS, "ckpt": str(source), "input": str(images), "image_dir": "train", "out": str(out),
                 "workers": 0, "device": "cpu", "progress": False})
    return pd.read_csv(out.with_name(f"{out.stem}_probabilities.csv"))[list(CLASS_NAMES)].to_numpy()


@pytest.mark.parametrize(("name", "size", "crop", "head"), FAMILIES)
def test_a_backbone_family_from_pretrained_weights_to_an_export(name: str, size: int, crop: int | None, head: set[str],
                                                                tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = timm.create_model(name, pretrained=False, in_chans=3)  # "pretrained": 3 channels, the architecture's size
    source = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(source))
    cfg = compose_config([f"model.name={name}", f"model.pretrained={source}", f"data.image_size={size}",
                          *([f"crop.size={crop}"] if crop else []), "optimizer=adamw", "optimizer.lr=0.001"])
    resolve_model(cfg)  # img_size and dynamic_img_size `auto`, as a training run resolves them
    resolve_finetune(cfg)
    transformer = rgb.pretrained_cfg.get("fixed_input_size", False)  # timm's flag: the size is fixed at construction
    assert cfg.model.img_size == ((crop or size) if transformer else None)  # CNNs take any size
    assert cfg.model.dynamic_img_size is bool(crop)
    assert cfg.finetune.layer_decay == (0.75 if transformer else None)  # auto: layer decay for transformers
    module = HPAModule(model=plain(cfg.model), loss=LOSS, optimizer=plain(cfg.optimizer), augment=None,
                       lr_ratios=list(cfg.finetune.lr_ratios), layer_decay=cfg.finetune.layer_decay,
                       crop=plain(cfg.crop), mean=[0.5] * 4, std=[0.25] * 4)

    # the poster's rule on the first layer, whatever it is: R, G, B as in the weights, Y = R
    for layer in first_layers(module.net):
        stem, original = module.net.get_submodule(layer).weight.detach(), rgb.get_submodule(layer).weight.detach()
        assert stem.shape[1] == 4
        torch.testing.assert_close(stem[:, :3], original, rtol=0, atol=0)
        torch.testing.assert_close(stem[:, 3], original[:, 0], rtol=0, atol=0)
    assert module.head_names == head  # the whole head, not get_classifier() alone

    snapshots, trace = Snapshots(), LRTrace(str(tmp_path / "trace"), plot=False)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path, callbacks=[FreezeBackbone(1), snapshots, trace])
    before = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    trainer.fit(module, DataLoader(RandomRGBY(size), batch_size=4))

    # the frozen stage trained the whole head and nothing else; then everything trained
    frozen, unfrozen = snapshots.after_epoch
    body = [k for k in before if k not in head and "num_batches_tracked" not in k]
    changed = [k for k in body if not torch.equal(frozen[k], before[k])]
    assert not changed, changed[:5]
    assert all(not torch.equal(frozen[k], before[k]) for k in head)
    first = f"{first_layers(module.net)[0]}.weight"
    assert not torch.equal(unfrozen[first], frozen[first])
    optimizer = trainer.optimizers[0]
    head_group = {id(p) for g in optimizer.param_groups if g["name"] in ("head", "head_no_decay") for p in g["params"]}
    assert head_group == {id(p) for n, p in module.net.named_parameters() if n in head}
    lrs = {k: v for k, v in trace.rows[0].items() if k not in ("step", "epoch")}
    if transformer:  # layer-wise decay: each layer's LR the next one's times 0.75, the head's optimizer.lr
        values = list(lrs.values())
        assert list(lrs)[0] == "stem" and list(lrs)[-1] == "head" and values[-1] == pytest.approx(0.001)
        np.testing.assert_allclose(np.array(values[:-1]) / np.array(values[1:]), 0.75, rtol=1e-6)
    else:
        assert lrs == pytest.approx({"early": 0.001 / 9, "late": 0.001 / 3, "head": 0.001})

    # checkpoint -> predict -> export -> predict from the export: the same probabilities
    run_dir = tmp_path / "run"
    trainer.save_checkpoint(run_dir / "checkpoints" / "best.ckpt", weights_only=False)
    (run_dir / "results.json").write_text(json.dumps({"status": "completed", "image_size": size}))
    images = write_kaggle_folder(tmp_path / "images", {f"id{i}": "0" for i in range(3)}, size=size)
    from_checkpoint = predicted(run_dir, images, tmp_path / "checkpoint.csv")
    export = export_model(run_dir, tmp_path / "export")
    np.testing.assert_allclose(predicted(export, images, tmp_path / "export.csv"), from_checkpoint, rtol=0, atol=1e-6)
    card = json.loads((export / "card.json").read_text())
    assert card["img_size"] == cfg.model.img_size and card["dynamic_img_size"] is bool(crop)
    if transformer:  # the card alone rebuilds the network with timm, Swin's windows and MaxViT's partitions included
        standalone = timm.create_model(card["architecture"], pretrained=False, **card["timm_args"])
        standalone.load_state_dict(load_file(str(export / "model.safetensors")))
