"""The real configs compose for every experiment, and the real entry point trains, tests and reports end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from hpa_lightning.classes import CLASS_NAMES
from tests.conftest import REPO, assert_metrics_equal_sklearn, compose_config, run_train

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def test_every_poster_arm_exists() -> None:
    expected = {"bce", "focal_g02", "focal_g05", "focal_g1", "focal_g2"}
    assert expected | {f"{e}_sgdr" for e in expected} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment: str) -> None:
    cfg = compose_config([f"+experiment={experiment}"])
    assert cfg.experiment_name == experiment
    gamma = {"bce": 0.0, "g02": 0.2, "g05": 0.5, "g1": 1.0, "g2": 2.0}[experiment.removesuffix("_sgdr").split("_")[-1]]
    assert cfg.loss.get("gamma", 0.0) == pytest.approx(gamma)
    schedule = "sgdr" if experiment.endswith("_sgdr") else "constant"
    assert cfg.scheduler._target_ == f"hpa_lightning.models.schedulers.{schedule}"
    assert cfg.model.name == "resnet50" and cfg.model.pretrained is True  # the poster's model by default


def test_defaults_are_the_poster_recipe_on_synthetic_data() -> None:
    cfg = compose_config([])
    assert cfg.data.synthetic is not None
    assert cfg.finetune.frozen_epochs == "auto" and cfg.finetune.lr_ratios == "auto"  # the poster's, pretrained
    assert cfg.trainer.accelerator == "auto"
    assert "experiment" not in cfg  # only through +experiment=


def test_real_data_config_requires_root() -> None:
    cfg = compose_config(["+experiment=focal_g02", "data=hpa", "data.root=/data/hpa"])
    assert cfg.data.root == "/data/hpa" and cfg.data.synthetic is None and cfg.data.image_size == 512


@pytest.fixture(scope="module")
def tiny_run(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "focal_g02"
    proc = run_train(["+experiment=focal_g02", "+preset=tiny", f"hydra.run.dir={run_dir}",
                      "+callbacks.warn._target_=tests.training.faults.RealWarning"], shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run folder: {run_dir}" in proc.stdout
    (run_dir.parent / "console.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


@pytest.mark.slow
def test_a_quiet_honest_console_and_a_full_run_log(tiny_run: Path) -> None:
    from hpa_lightning.logs import BENIGN_LOG_MESSAGES, BENIGN_WARNINGS

    console = (tiny_run.parent / "console.txt").read_text()
    log = (tiny_run / "train.log").read_text()
    for text in ("srun", "Experiment logs directory", "LeafSpec", "litlogger", *BENIGN_LOG_MESSAGES):
        assert text not in console and text not in log, text
    assert len(BENIGN_WARNINGS) == 4
    for text in ("an unexpected condition worth a look", "`Trainer.fit` stopped", f"run folder: {tiny_run}"):
        assert text in console and text in log, text  # real warnings stay visible, and the run log is whole
    # once: Lightning's own stderr handler (added when it is imported) handed back to the run's logging
    assert console.count("`Trainer.fit` stopped") == 1 and console.count("Seed set to") == 1, console


@pytest.mark.slow
def test_run_folder_contents(tiny_run: Path) -> None:
    for name in ("results.json", "test_predictions.csv", "split.csv", "thresholds.json", "config.yaml",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt", "metrics.csv", "lr_trace.csv"):
        assert (tiny_run / name).is_file(), name
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["experiment"] == "focal_g02" and results["loss"] == "focal" and results["gamma"] == 0.2
    assert results["pretrained_loaded"] is False and results["device"] == "cpu" and results["seed"] == 42
    assert (results["precision"], results["benchmark"], results["channels_last"], results["speed_auto"]) == (
        "32-true", False, False, ["benchmark", "channels_last", "precision"])
    assert (results["world_size"], results["num_nodes"], results["devices_per_node"]) == (1, 1, 1)
    assert Path(results["best_checkpoint"]).is_file() and results["wall_time_s"] > 0
    assert results["class_names"] == list(CLASS_NAMES)
    assert len(results["test"]["per_class_f1"]) == 28
    metrics = pd.read_csv(tiny_run / "metrics.csv")
    for column in ("train/loss_epoch", "val/macro_f1", "val/roc_auc", "test/macro_f1", "test/roc_auc", "lr/head"):
        assert column in metrics.columns


@pytest.mark.slow
def test_reported_metrics_equal_sklearn_on_saved_predictions(tiny_run: Path) -> None:
    results = json.loads((tiny_run / "results.json").read_text())
    predictions = pd.read_csv(tiny_run / "test_predictions.csv")
    split = pd.read_csv(tiny_run / "split.csv")
    assert predictions["Id"].is_unique
    assert set(predictions["Id"]) == set(split.loc[split["split"] == "test", "Id"])
    assert results["test"]["n_samples"] == len(predictions)
    assert_metrics_equal_sklearn(tiny_run, results, predictions)


@pytest.mark.slow
def test_bad_data_root_is_one_clear_line(tmp_path: Path, shared_cache: Path) -> None:
    proc = run_train(["+experiment=bce", "data=hpa", f"data.root={tmp_path / 'nothing'}",
                      f"hydra.run.dir={tmp_path / 'run'}"], shared_cache, REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nothing' / 'train.csv'}: file not found"
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize(("pretrained", "frozen", "ratios"),
                         [(True, 1, [1 / 9, 1 / 3, 1.0]), (False, 0, [1.0, 1.0, 1.0])])
def test_auto_recipe_follows_the_pretrained_weights(pretrained: bool, frozen: int, ratios: list[float]) -> None:
    from hpa_lightning.training.job import resolve_finetune

    cfg = compose_config(["+experiment=focal_g02", f"model.pretrained={str(pretrained).lower()}"])
    assert resolve_finetune(cfg) == ["frozen_epochs", "lr_ratios", "layer_decay"]
    assert cfg.finetune.frozen_epochs == frozen and list(cfg.finetune.lr_ratios) == pytest.approx(ratios)
    assert cfg.finetune.layer_decay is None  # a CNN: the depth groups
    explicit = compose_config(["+experiment=focal_g02", "model.pretrained=false", "finetune.frozen_epochs=2",
                              "finetune.lr_ratios=[0.5,1,1]", "finetune.layer_decay=null"])
    assert resolve_finetune(explicit) == [] and explicit.finetune.frozen_epochs == 2  # explicit values win
    assert list(explicit.finetune.lr_ratios) == [0.5, 1, 1]


def test_every_callback_comes_from_the_config_group_and_can_be_removed(tmp_path: Path) -> None:
    from hpa_lightning.training.callbacks import FreezeBackbone, InterruptCheckpoint
    from hpa_lightning.training.job import build_callbacks, resolve_finetune

    cfg = compose_config(["+experiment=focal_g02", "model.pretrained=true", f"paths.output_dir={tmp_path}"])
    resolve_finetune(cfg)
    callbacks = build_callbacks(cfg)
    names = [type(c).__name__ for c in callbacks]
    assert names == ["FreezeBackbone", "LRTrace", "RNGState", "MidEpochState", "FiniteCheckpointGuard",
                     "InterruptCheckpoint", "ModelCheckpoint", "ModelCheckpoint"]
    assert next(c for c in callbacks if isinstance(c, FreezeBackbone)).frozen_epochs == 1  # `auto`, resolved
    fewer = compose_config(["+experiment=focal_g02", "~callbacks.lr_trace", "~callbacks.interrupt_checkpoint",
                           f"paths.output_dir={tmp_path}"])
    resolve_finetune(fewer)
    left = build_callbacks(fewer)
    assert "LRTrace" not in [type(c).__name__ for c in left]
    assert not any(isinstance(c, InterruptCheckpoint) for c in left)


@pytest.mark.parametrize(("arm", "schedule"), [("bce", "constant"), ("bce_sgdr", "sgdr"), ("focal_g02_sgdr", "sgdr")])
def test_the_demo_preset_keeps_every_swept_arms_schedule(arm: str, schedule: str) -> None:
    """`+sweep=poster +preset=demo`: Hydra's sweeper puts `+experiment=<arm>` before the command line, so a schedule in
    the preset silently replaced every arm's (all ten ran with cosine in the first `make reproduce`)."""
    swept = compose_config([f"+experiment={arm}", "+sweep=poster", "+preset=demo"])  # the order the sweeper uses
    assert swept.scheduler._target_.endswith(f".{schedule}") and swept.model.name == "resnet10t"
    demo = compose_config(["+experiment=focal_g02", "+preset=demo", "scheduler=cosine"])  # make demo
    assert demo.scheduler._target_ == "hpa_lightning.models.schedulers.cosine"


@pytest.mark.parametrize(("overrides", "layer_decay"), [
    (["model.name=vit_tiny_patch16_224"], 0.75),  # a pretrained transformer: BEiT/MAE/DINOv2's layer-wise decay
    (["model.name=swin_tiny_patch4_window7_224"], 0.75),
    (["model.name=convnext_atto"], None),  # CNNs keep the poster's three depth groups
    (["model.name=vit_tiny_patch16_224", "model.pretrained=false"], None),  # from scratch: equal LRs
    (["model.name=vit_tiny_patch16_224", "finetune.layer_decay=0.65"], 0.65),  # explicit values win
    (["model.name=resnet18", "finetune.layer_decay=0.8"], 0.8),
])
def test_layer_decay_auto_is_for_pretrained_transformers(overrides: list[str], layer_decay: float | None) -> None:
    from hpa_lightning.training.job import resolve_finetune

    cfg = compose_config(overrides)
    resolve_finetune(cfg)
    assert cfg.finetune.layer_decay == layer_decay


def test_a_layer_decay_outside_0_1_is_one_line() -> None:
    from hpa_lightning.errors import FrozenStageError
    from hpa_lightning.training.job import resolve_finetune

    with pytest.raises(FrozenStageError, match=r"finetune.layer_decay=1.5: expected auto, null or a factor in \(0, 1"):
        resolve_finetune(compose_config(["finetune.layer_decay=1.5"]))


@pytest.mark.parametrize(("overrides", "img_size", "dynamic"), [
    (["model.name=vit_tiny_patch16_224", "data.image_size=64"], 64, False),
    # trained on crops, evaluated on the full images: dynamic image size where timm offers it
    (["model.name=vit_tiny_patch16_224", "data.image_size=64", "crop.size=48"], 48, True),
    (["model.name=vit_tiny_patch16_224", "data.image_size=64", "crop.size=48", "crop.eval=center"], 48, False),
    (["model.name=maxvit_pico_rw_256", "data.image_size=128", "crop.size=64"], 64, False),  # no dynamic size in timm
    (["model.name=resnet18", "data.image_size=64", "crop.size=48"], None, False),  # CNNs take any size
])
def test_the_model_node_gets_the_size_it_trains_on(overrides: list[str], img_size: int | None,
                                                   dynamic: bool) -> None:
    from hpa_lightning.training.job import resolve_model

    cfg = compose_config(overrides)
    assert cfg.model.img_size == "auto" and cfg.model.dynamic_img_size == "auto"
    resolve_model(cfg)
    assert cfg.model.img_size == img_size and cfg.model.dynamic_img_size is dynamic


def test_an_explicit_network_size_other_than_the_training_size_is_one_line() -> None:
    from hpa_lightning.errors import ConfigError
    from hpa_lightning.training.job import resolve_model

    cfg = compose_config(["model.name=vit_tiny_patch16_224", "data.image_size=64", "model.img_size=224"])
    with pytest.raises(ConfigError, match=r"model.img_size=224: vit_tiny_patch16_224 trains on data.image_size=64 px"):
        resolve_model(cfg)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.name=resnet5o"], "model.name='resnet5o': not a timm architecture"),
    (["model.name=resnet18", "model.global_pool=median"], "model.global_pool='median': timm cannot build resnet18"),
    (["model.name=resnet18", "model.pretrained_channels=[red,green]"], "model.pretrained_channels=[red, green]: 2"),
])
def test_a_model_node_that_cannot_be_built_is_one_line_before_any_data(overrides: list[str], message: str) -> None:
    from hpa_lightning.errors import ConfigError
    from hpa_lightning.training.job import resolve_model

    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_model(compose_config(overrides))


def test_scratch_is_one_switch_and_the_demo_shares_it() -> None:
    """+preset=scratch: AdamW 0.002, cosine, no frozen epoch, equal LRs, no pretrained weights; the demo preset
    includes the same shared part (conf/preset/scratch_base.yaml) and adds its sizes, never a schedule."""
    scratch = compose_config(["+preset=scratch"])
    assert scratch.recipe == "scratch" and scratch.model.pretrained is False
    assert scratch.optimizer._target_ == "torch.optim.AdamW" and scratch.optimizer.lr == pytest.approx(0.002)
    assert scratch.scheduler._target_ == "hpa_lightning.models.schedulers.cosine"
    assert scratch.finetune.frozen_epochs == 0 and list(scratch.finetune.lr_ratios) == [1.0, 1.0, 1.0]
    assert scratch.finetune.layer_decay is None and scratch.model.name == "resnet50"
    demo = compose_config(["+experiment=focal_g02", "+preset=demo", "scheduler=cosine"])  # make demo
    for key in ("recipe", "model.pretrained", "optimizer", "scheduler", "finetune"):
        assert OmegaConf.select(demo, key) == OmegaConf.select(scratch, key), key
    assert demo.model.name == "resnet10t" and demo.trainer.max_epochs == 6
    assert compose_config([]).recipe == "poster"


def test_the_log_says_which_recipe_runs(caplog: pytest.LogCaptureFixture) -> None:
    from hpa_lightning.training.job import log_recipe, resolve_finetune

    scratch = compose_config(["+preset=scratch"])
    resolve_finetune(scratch)
    with caplog.at_level("INFO", logger="hpa_lightning.training.job"):
        log_recipe(scratch)
    assert caplog.messages == ["recipe: scratch (no pretrained weights; AdamW lr=0.002, schedule cosine, "
                               "frozen_epochs=0, LR ratios [1.0, 1.0, 1.0])"]
    caplog.clear()
    poster_from_scratch = compose_config(["model.pretrained=false"])
    resolve_finetune(poster_from_scratch)
    with caplog.at_level("INFO", logger="hpa_lightning.training.job"):
        log_recipe(poster_from_scratch)
    assert caplog.messages[0].startswith("recipe: poster (no pretrained weights; SGD lr=0.02, schedule constant")
    assert "+preset=scratch is the recipe for it" in caplog.messages[1]
    # the warning is about SGD by type: ASGD (an "SGD" in its name) is not warned about, a subclass of SGD is
    for optimizer, warned in (("torch.optim.ASGD", False), ("tests.training.test_train.NesterovSGD", True)):
        caplog.clear()
        own = compose_config(["model.pretrained=false", f"optimizer._target_={optimizer}"])
        resolve_finetune(own)
        with caplog.at_level("INFO", logger="hpa_lightning.training.job"):
            log_recipe(own)
        assert any("+preset=scratch" in message for message in caplog.messages) == warned, optimizer


class NesterovSGD(torch.optim.SGD):
    """A lab's SGD of its own (the warning must recognise it by type)."""


@pytest.mark.slow
def test_a_vit_from_a_local_224px_file_trains_at_the_data_size(shared_cache: Path, tmp_path: Path) -> None:
    """The issue's failure (`model.name=vit_tiny_patch16_224 model.pretrained=<3-channel file> data.image_size=...`
    raised `Input height (64) doesn't match model (224)`): through the entry point it trains, with layer-wise LR decay
    in the LR trace, the frozen first epoch, and the network's size recorded."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "vit_tiny.safetensors"
    rgb = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=3)  # 224 px, like timm's weights
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(weights))
    run_dir = tmp_path / "run"
    proc = run_train(["+experiment=focal_g02", "+preset=tiny", "model.name=vit_tiny_patch16_224",
                      f"model.pretrained={weights}", f"hydra.run.dir={run_dir}"], shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["pretrained_loaded"] is True and results["layer_decay"] == 0.75 and results["frozen_epochs"] == 1
    assert results["model_img_size"] == results["image_size"] == 32 and results["recipe"] == "poster"
    trace = pd.read_csv(run_dir / "lr_trace.csv")
    assert list(trace.columns) == ["step", "epoch", "stem", *[f"blocks.{i}" for i in range(11)], "blocks.11+norm",
                                   "head"]
    assert (run_dir / "lr_trace.png").is_file()  # one line per layer, coloured from the stem to the head
    assert "recipe: poster (pretrained weights; SGD lr=0.02" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_size_the_architecture_cannot_run_at_is_one_line_exit_2_before_any_data(shared_cache: Path,
                                                                                   tmp_path: Path) -> None:
    proc = run_train(["+preset=tiny", "model.name=maxvit_pico_rw_256", "data.image_size=72",
                      f"hydra.run.dir={tmp_path / 'run'}"], shared_cache, REPO)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.name=maxvit_pico_rw_256 cannot run at data.image_size=72 (AssertionError")
    assert last.endswith("the nearest size that works is data.image_size=64")
    assert not (tmp_path / "run" / "results.json").exists()
