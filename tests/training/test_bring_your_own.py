"""A researcher's own code, from a module outside the package, built from configuration as written (docs/extending.md);
the same code named by a checkpoint or a saved run is refused until the user trusts it by its exact name.

`labcode` (written by the `lab` fixture into a temporary folder put on the path) holds what a lab would write: a
multi-label loss (asymmetric loss, Ridnik et al. 2021), a backbone factory, an augmentation and a callback; `labconf/`
holds their config options, added with `hydra.searchpath`.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from hpa_lightning.errors import UnsafeTargetError
from hpa_lightning.models.module import HPAModule
from hpa_lightning.runs.outputs import plain, target_name
from tests.conftest import REPO, compose_config, run_train, write_kaggle_folder

LAB_CODE = '''
import json
from pathlib import Path

import lightning as L
import timm
import torch
from torch import nn


class AsymmetricLoss(nn.Module):
    """Asymmetric loss for multi-label classification (Ridnik et al., ICCV 2021), mean over the batch."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, logits, targets):
        p = torch.sigmoid(logits.float())
        p_neg = (p - self.clip).clamp(min=0) if self.clip else p
        pos = targets * (1 - p) ** self.gamma_pos * torch.log(p.clamp(min=1e-8))
        neg = (1 - targets) * p_neg ** self.gamma_neg * torch.log((1 - p_neg).clamp(min=1e-8))
        return -(pos + neg).sum(dim=1).mean()


def small_backbone(num_classes: int, arch: str = "resnet10t", pretrained: bool = False, width: float = 1.0):
    """A timm network with 4 input channels; `width` is this lab's own knob (recorded to prove it arrived)."""
    net = timm.create_model(arch, pretrained=False, in_chans=4, num_classes=num_classes)
    net.lab_width = width
    return net


class AddNoise(nn.Module):
    def __init__(self, std: float = 0.01):
        super().__init__()
        self.std = std

    def forward(self, x):
        return x + self.std * torch.randn_like(x)


class CountBatches(L.Callback):
    def __init__(self, path: str):
        self.path, self.batches = Path(path), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_fit_end(self, trainer, pl_module):
        self.path.write_text(json.dumps({"batches": self.batches, "loss": type(pl_module.criterion).__name__}))
'''

LAB_CONF = {
    "loss/asymmetric.yaml": "_target_: labcode.AsymmetricLoss\ngamma_neg: 4.0\ngamma_pos: 0.0\nclip: 0.05\n",
    "model/small.yaml": "_target_: labcode.small_backbone\narch: resnet10t\npretrained: false\nwidth: 0.5\n",
    "optimizer/rmsprop.yaml": "_target_: torch.optim.RMSprop\n_partial_: true\nlr: 1.0e-3\nweight_decay: 0.0\n",
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lab's folder: `labcode.py` and `labconf/` with options of the loss, model and optimizer groups."""
    root = tmp_path_factory.mktemp("lab")
    (root / "labcode.py").write_text(textwrap.dedent(LAB_CODE))
    for name, text in LAB_CONF.items():
        (root / "labconf" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "labconf" / name).write_text(text)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("labcode", None)


MODEL = {"name": "resnet10t", "pretrained": False}
SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
FOCAL = {"_target_": "hpa_lightning.models.losses.FocalLoss", "gamma": 0.2}


@pytest.mark.parametrize("loss", ["bce", "focal", "focal_lovasz"])
@pytest.mark.parametrize("experiment", ["focal_g02", "focal_g2_sgdr", "bce"])
def test_config_nodes_are_constructor_arguments(experiment: str, loss: str) -> None:
    """`instantiate` builds each node as composed, nothing stripped; an arm's gamma never leaks into BCE."""
    cfg = compose_config([f"+experiment={experiment}", f"loss={loss}", "model.pretrained=false"])
    criterion = instantiate(cfg.loss)
    if loss == "bce":
        assert "gamma" not in cfg.loss and criterion.gamma == 0.0
    else:
        gamma = {"focal_g02": 0.2, "focal_g2_sgdr": 2.0, "bce": 2.0}[experiment]
        focal = criterion.losses[0] if loss == "focal_lovasz" else criterion
        assert focal.gamma == pytest.approx(gamma)
    net = instantiate(cfg.model, num_classes=28)
    assert isinstance(net, torch.nn.Module) and net.get_classifier().out_features == 28
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert type(optimizer).__name__ == "SGD"
    schedule = instantiate(cfg.scheduler)(optimizer, total_steps=10, steps_per_epoch=5)
    assert isinstance(schedule, torch.optim.lr_scheduler.LRScheduler)
    assert not {"channels_last", "compile", "sync_batchnorm"} & set(cfg.model) and "name" not in cfg.loss


def test_display_names_come_from_the_targets() -> None:
    names = {option: target_name(plain(compose_config([f"loss={option}"]).loss))
             for option in ("bce", "focal", "focal_lovasz")}
    assert names == {"bce": "bce", "focal": "focal", "focal_lovasz": "focal+lovasz_hinge"}
    assert target_name({"_target_": "torch.optim.lr_scheduler.MultiStepLR"}) == "multi_step_lr"
    assert target_name({"_target_": "labcode.AsymmetricLoss"}) == "asymmetric"
    assert target_name(None) is None
    # a sum is named by its terms (configuration), whatever class sums them
    terms = [{"_target_": "hpa_lightning.models.losses.FocalLoss"}, {"_target_": "labcode.AsymmetricLoss"}]
    assert target_name({"_target_": "labcode.MySum", "losses": terms}) == "focal+asymmetric"


def test_checkpoints_of_the_old_node_shapes_still_load(tmp_path: Path) -> None:
    """Before the nodes were constructor arguments, checkpoints held a display `name` in the loss and scheduler
    and the module's and trainer's switches in the model node."""
    module = HPAModule(model=MODEL, loss=FOCAL, optimizer=SGD, mean=[0.1] * 4, std=[0.2] * 4)
    old = {**dict(module.hparams),
           "model": {**MODEL, "channels_last": True, "compile": False, "sync_batchnorm": False},
           "loss": {**FOCAL, "name": "focal"},
           "scheduler": {"_target_": "hpa_lightning.models.schedulers.sgdr", "_partial_": True, "name": "sgdr"}}
    for key in ("channels_last", "compile", "scheduler_interval"):
        old.pop(key)
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": old, "state_dict": module.state_dict(), "pytorch-lightning_version": "2.6.6"}, path)
    loaded = HPAModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.channels_last is True and loaded.compile_net is False
    assert "name" not in loaded.hparams.loss and "name" not in loaded.hparams.scheduler
    assert "channels_last" not in loaded.hparams.model and loaded.hparams.channels_last is True
    assert loaded.criterion.gamma == pytest.approx(0.2) and loaded.hparams.scheduler_interval == "step"


@pytest.mark.parametrize("optimizer", ["torch.optim.RMSprop", "torch.optim.Adagrad", "timm.optim.Lamb"])
def test_any_optimizer_class_gets_the_depth_groups(optimizer: str) -> None:
    node = {"_target_": optimizer, "_partial_": True, "lr": 0.09, "weight_decay": 1e-4}
    module = HPAModule(model=MODEL, loss=FOCAL, optimizer=node)
    built = module.configure_optimizers()
    assert type(built).__name__ == optimizer.rsplit(".", 1)[-1]
    lrs = {group["name"]: group["lr"] for group in built.param_groups}
    assert lrs["head"] == pytest.approx(0.09) and lrs["early"] == pytest.approx(0.01)
    assert lrs["late"] == pytest.approx(0.03)


def test_the_users_loss_is_built_and_a_checkpoint_naming_it_needs_exact_trust(lab: Path, tmp_path: Path,
                                                                               monkeypatch) -> None:
    monkeypatch.setenv("HPA_TRUST_TARGETS", "")
    module = HPAModule(model=MODEL, loss={"_target_": "labcode.AsymmetricLoss", "gamma_neg": 2.0},
                       optimizer=SGD)
    assert type(module.criterion).__name__ == "AsymmetricLoss" and module.criterion.gamma_neg == 2.0
    logits, targets = torch.randn(4, 28, requires_grad=True), (torch.rand(4, 28) > 0.8).float()
    module.criterion(logits, targets).backward()
    assert torch.isfinite(logits.grad).all()
    path = tmp_path / "own.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "pytorch-lightning_version": "2.6.6"}, path)
    loader = HPAModule.load_from_checkpoint
    with pytest.raises(UnsafeTargetError) as refused:
        loader(path, map_location="cpu")
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "hyper_parameters.loss._target_" in message
    assert "trust=labcode.AsymmetricLoss" in message
    for not_exact in (("labcode",), ("labcode.small_backbone",), ("labcode.AsymmetricLos",)):
        with pytest.raises(UnsafeTargetError):
            loader(path, map_location="cpu", trust=not_exact)
    assert type(loader(path, map_location="cpu", trust=("labcode.AsymmetricLoss",)).criterion).__name__ == (
        "AsymmetricLoss")
    monkeypatch.setenv("HPA_TRUST_TARGETS", "labcode.AsymmetricLoss")
    assert HPAModule.load_from_checkpoint(path, map_location="cpu").criterion.gamma_neg == 2.0


def test_trusting_a_module_of_your_own_does_not_open_a_path_through_it(lab: Path, tmp_path: Path) -> None:
    """`labcode.json.loads`, `labcode.torch.load`: reached through a trusted module, they are still not trusted."""
    module = HPAModule(model=MODEL, loss=FOCAL, optimizer=SGD)
    marker = tmp_path / "pwned"
    for attack in ({"_target_": "labcode.Path.write_text", "_args_": [str(marker), "x"]},
                   {"_target_": "labcode.torch.load", "f": str(marker)}):
        path = tmp_path / "evil.ckpt"
        torch.save({"hyper_parameters": {**dict(module.hparams), "loss": attack},
                    "state_dict": module.state_dict()}, path)
        with pytest.raises(UnsafeTargetError):
            HPAModule.load_from_checkpoint(path, map_location="cpu", trust=("labcode.AsymmetricLoss",))
        assert not marker.exists()


# ---- end to end: a sweep over the poster's losses and the lab's own, then predict with and without trust ----------

def lab_args(lab: Path) -> list[str]:
    return [f"hydra.searchpath=[file://{lab / 'labconf'}]", "+preset=tiny", "trainer.max_epochs=2",
            "model=small", "optimizer=rmsprop", "scheduler=multistep", "scheduler.milestones=[1]",
            "+augment.lab_noise._target_=labcode.AddNoise", "+augment.lab_noise.std=0.02",
            "+callbacks.count._target_=labcode.CountBatches", "+callbacks.count.path=${paths.output_dir}/count.json"]


@pytest.fixture(scope="module")
def lab_sweep(lab: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep = tmp_path_factory.mktemp("lab_sweep")
    env = {"PYTHONPATH": str(lab)}
    proc = run_train(["-m", "loss=bce,focal,asymmetric", "+experiment=focal_g02", *lab_args(lab),
                      f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"],
                     shared_cache, REPO, extra_env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


@pytest.mark.slow
def test_a_sweep_over_the_posters_losses_and_the_labs_own(lab_sweep: Path) -> None:
    results = [json.loads((lab_sweep / str(job) / "results.json").read_text()) for job in range(3)]
    assert [r["loss"] for r in results] == ["bce", "focal", "asymmetric"]
    assert [r["gamma"] for r in results] == [0.0, 0.2, 0.0]  # the arm's gamma reached focal only
    for job, result in enumerate(results):
        count = json.loads((lab_sweep / str(job) / "count.json").read_text())
        assert count["loss"] == ["FocalLoss", "FocalLoss", "AsymmetricLoss"][job] and count["batches"] > 0
        assert result["scheduler"] == "multi_step_lr" and result["model"] == "small_backbone"
        checkpoint = torch.load(lab_sweep / str(job) / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["hyper_parameters"]["model"]["width"] == 0.5
        trace = pd.read_csv(lab_sweep / str(job) / "lr_trace.csv")
        head = trace.groupby("epoch")["head"].agg(["min", "max"])
        # MultiStepLR stepped per epoch: one LR through epoch 0, a tenth of it through epoch 1
        assert head.loc[0, "min"] == head.loc[0, "max"] == pytest.approx(1e-3)
        assert head.loc[1, "min"] == head.loc[1, "max"] == pytest.approx(1e-4)


def refused_line(capsys, command, args: list[str]) -> str:
    """The one `error:` line of a command that must exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        command(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert refused.value.code == 2 and len(errors) == 1, errors
    return errors[0]


@pytest.mark.slow
def test_predict_needs_trust_for_the_labs_network_and_never_for_its_loss(lab: Path, lab_sweep: Path, tmp_path: Path,
                                                                         monkeypatch, capsys) -> None:
    from hpa_lightning import export, predict

    monkeypatch.setenv("HPA_TRUST_TARGETS", "")
    images = write_kaggle_folder(tmp_path / "new", {f"n{i}": "0" for i in range(5)})
    common = [f"input={images}", "image_dir=train", "workers=0", "progress=false"]
    bce_run, lab_run = lab_sweep / "0", lab_sweep / "2"  # the lab's backbone with BCE; with the lab's loss too
    error = refused_line(capsys, predict.main, [f"ckpt={bce_run}", f"out={tmp_path / 'x.csv'}", *common])
    assert "hyper_parameters.model._target_" in error and "trust=labcode.small_backbone" in error
    assert not (tmp_path / "x.csv").exists()
    predict.main([f"ckpt={lab_run}", f"out={tmp_path / 'a.csv'}", *common, "trust=labcode.small_backbone"])
    first = pd.read_csv(tmp_path / "a_probabilities.csv")  # the lab's loss needed no trust: it is never built
    assert len(first) == 5
    monkeypatch.setenv("HPA_TRUST_TARGETS", "")  # predict trusted it for its own process
    error = refused_line(capsys, export.main, [f"ckpt={lab_run}", f"out={tmp_path / 'refused'}"])
    assert "trust=labcode.small_backbone" in error and not (tmp_path / "refused").exists()
    export.main([f"ckpt={lab_run}", f"out={tmp_path / 'export'}", "trust=labcode.small_backbone"])
    card = json.loads((tmp_path / "export" / "card.json").read_text())
    assert card["factory"]["_target_"] == "labcode.small_backbone" and card["factory"]["width"] == 0.5
    monkeypatch.setenv("HPA_TRUST_TARGETS", "")
    error = refused_line(capsys, predict.main, [f"ckpt={tmp_path / 'export'}", f"out={tmp_path / 'b.csv'}", *common])
    assert "card.json" in error and "factory._target_" in error
    predict.main([f"ckpt={tmp_path / 'export'}", f"out={tmp_path / 'b.csv'}", *common,
                  "trust=labcode.small_backbone"])
    pd.testing.assert_frame_equal(first, pd.read_csv(tmp_path / "b_probabilities.csv"), atol=1e-5)


@pytest.mark.slow
def test_resume_of_a_run_with_the_labs_code_needs_trust(lab: Path, lab_sweep: Path, shared_cache: Path,
                                                        tmp_path: Path) -> None:
    """A saved run folder names the lab's code: resuming it is refused in one line, and runs with trust= (finding
    the lab's config options again through the searchpath saved in hydra.yaml)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(lab_sweep / "2", run_dir)
    # as a single run saves them: the config dir of the lab's options is in .hydra/hydra.yaml, not in the overrides
    overrides = ["+experiment=focal_g02", "loss=asymmetric", *lab_args(lab)[1:]]
    (run_dir / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))  # JSON is YAML
    (run_dir / "results.json").unlink()  # as if it had stopped before the end
    env = {"PYTHONPATH": str(lab), "HPA_TRUST_TARGETS": ""}
    refused = run_train([str(run_dir)], shared_cache, REPO, module="hpa_lightning.resume", extra_env=env)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-2000:]
    # every callable outside the allowlist named at once (RMSprop too: conf/ names only SGD and AdamW), with the
    # trust= value that accepts them
    trust = errors[0].split("pass ", 1)[1].split(" ", 1)[0]
    assert set(trust.removeprefix("trust=").split(",")) == {
        "labcode.small_backbone", "labcode.AsymmetricLoss", "torch.optim.RMSprop", "labcode.AddNoise",
        "labcode.CountBatches"}, errors[0]
    trusted = run_train([str(run_dir), trust], shared_cache, REPO, module="hpa_lightning.resume", extra_env=env)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["loss"] == "asymmetric"
