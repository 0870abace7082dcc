"""Inference on new images: Kaggle submission, TTA, safe checkpoint loading, bad inputs, the exported model folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hpa_lightning import metrics
from hpa_lightning.classes import CHANNELS, CLASS_NAMES
from hpa_lightning.errors import InferenceError
from hpa_lightning.export import main as export_main
from hpa_lightning.inference.export_folder import export_model
from hpa_lightning.inference.load import load_model
from hpa_lightning.inference.predictor import resolve_input
from hpa_lightning.inference.tta import TTA_VIEWS, crop_windows, tta_probabilities, tta_views
from hpa_lightning.models.module import HPAModule
from hpa_lightning.predict import main as predict_main
from tests.conftest import REPO, png_declaring

FAKE_SIZE = 32


def run_module(module: str, args: list[str], cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HPA_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_sample_submission(root: Path, ids: list[str]) -> None:
    pd.DataFrame({"Id": ids, "Predicted": ["0"] * len(ids)}).to_csv(root / "sample_submission.csv", index=False)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kaggle-style test folder: synthetic images in test/ and a sample_submission.csv in shuffled order."""
    from hpa_lightning.data.simulator.dataset import generate

    root = generate(tmp_path_factory.mktemp("held_out") / "kaggle_test", n=12, seed=123, size=48, workers=1)
    (root / "train").rename(root / "test")
    ids = pd.read_csv(root / "train.csv", dtype=str)["Id"].tolist()
    (root / "train.csv").unlink()
    write_sample_submission(root, [ids[i] for i in np.random.default_rng(0).permutation(len(ids))])
    return root


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with an untrained resnet18 checkpoint in Lightning's layout (no training: fast tests)."""
    run_dir = tmp_path_factory.mktemp("fake") / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    module = HPAModule(model={"name": "resnet18", "pretrained": False, "drop_rate": 0.0, "channels_last": False},
                       loss={"_target_": "hpa_lightning.models.losses.FocalLoss", "name": "focal", "gamma": 0.2},
                       optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.02},
                       mean=[0.05, 0.06, 0.04, 0.05], std=[0.06, 0.1, 0.1, 0.07], class_names=list(CLASS_NAMES))
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, ckpt)
    thresholds = {name: 0.3 + 0.01 * i for i, name in enumerate(CLASS_NAMES)}
    (run_dir / "thresholds.json").write_text(json.dumps({"thresholds": thresholds, "default": 0.5,
                                                         "ensure_one": True}))
    (run_dir / "results.json").write_text(json.dumps({"status": "completed", "image_size": FAKE_SIZE,
                                                      "best_checkpoint": str(ckpt)}))
    return run_dir


@pytest.fixture(scope="module")
def fake_export(fake_run: Path) -> Path:
    return export_model(fake_run, fake_run.parent / "export")


def predict(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the predict CLI in-process; (exit code, stdout, stderr)."""
    code = 0
    try:
        predict_main([*args, "progress=false"])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def read_outputs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    submission = pd.read_csv(out, dtype={"Id": str, "Predicted": str}, keep_default_na=False)
    probabilities = pd.read_csv(out.with_name(f"{out.stem}_probabilities.csv"), dtype={"Id": str})
    return submission, probabilities


def check_submission(submission: pd.DataFrame, probabilities: pd.DataFrame, ids: list[str]) -> list[list[int]]:
    assert list(submission.columns) == ["Id", "Predicted"]
    assert submission["Id"].tolist() == ids  # every Id once, in sample_submission order
    assert list(probabilities.columns) == ["Id", *CLASS_NAMES] and probabilities["Id"].tolist() == ids
    parsed = [[int(c) for c in p.split()] for p in submission["Predicted"]]
    assert all(0 <= c < len(CLASS_NAMES) for row in parsed for c in row)
    assert all(row == sorted(set(row)) for row in parsed)
    return parsed


# ---------------------------------------------------------------------------------------------- TTA

def test_tta_views_are_the_eight_symmetries_of_the_square() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    outputs = [view(x) for _, view in TTA_VIEWS]
    assert len({tuple(o.flatten().tolist()) for o in outputs}) == 8
    assert all(sorted(o.flatten().tolist()) == list(range(16)) for o in outputs)
    # closed under composition: a group, so averaging over it gives an invariant prediction
    keys = {tuple(o.flatten().tolist()) for o in outputs}
    assert all(tuple(b(a(x)).flatten().tolist()) in keys for _, a in TTA_VIEWS for _, b in TTA_VIEWS)
    assert [n for n, _ in tta_views(2)] == ["identity", "hflip"]
    assert [n for n, _ in tta_views(4)] == ["identity", "hflip", "vflip", "rot180"]
    with pytest.raises(InferenceError, match="tta=3"):
        tta_views(3)


def test_tta_of_an_invariant_model_equals_one_view() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 28)).eval()  # blind to geometry
    x = torch.randn(3, 4, 24, 24)
    single = tta_probabilities(net, x, 1)
    for n in (2, 4, 8):
        torch.testing.assert_close(tta_probabilities(net, x, n), single, rtol=0, atol=1e-6)


def test_tta_of_a_cnn_differs_and_is_the_mean_of_its_views(fake_run: Path) -> None:
    model = load_model(fake_run)
    torch.manual_seed(1)
    x = model.standardize(torch.randint(0, 256, (2, 4, FAKE_SIZE, FAKE_SIZE), dtype=torch.uint8))
    single, eight = tta_probabilities(model.net, x, 1), tta_probabilities(model.net, x, 8)
    assert (eight - single).abs().max() > 1e-4  # TTA does something on a normal model
    with torch.inference_mode():
        manual = torch.stack([torch.sigmoid(model.net(view(x))) for _, view in TTA_VIEWS]).mean(0)
    torch.testing.assert_close(eight, manual, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- outputs, export

def test_predict_writes_submission_and_export_reproduces_it(held_out: Path, fake_run: Path, fake_export: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ids = pd.read_csv(held_out / "sample_submission.csv", dtype=str)["Id"].tolist()
    code, out, err = predict(capsys, f"ckpt={fake_run}", f"input={held_out}", f"out={tmp_path / 'a' / 'sub.csv'}",
                             "tta=2", "workers=1", "batch_size=5")
    assert code == 0, err
    assert "predicted 12 samples" in out and "thresholds from" in out
    assert sorted(os.listdir(tmp_path / "a")) == ["sub.csv", "sub_probabilities.csv"]  # no temporaries left
    sub_a, probs_a = read_outputs(tmp_path / "a" / "sub.csv")
    parsed = check_submission(sub_a, probs_a, ids)
    assert all(parsed)  # ensure_one from thresholds.json
    thresholds = np.array([0.3 + 0.01 * i for i in range(len(CLASS_NAMES))])
    expected = metrics.decide(probs_a[list(CLASS_NAMES)].to_numpy(), thresholds, ensure_one=True)
    assert [list(np.flatnonzero(row)) for row in expected] == parsed

    code, _, err = predict(capsys, f"ckpt={fake_export}", f"input={held_out}", f"out={tmp_path / 'b' / 'sub.csv'}",
                           "tta=2", "workers=0")
    assert code == 0, err
    sub_b, probs_b = read_outputs(tmp_path / "b" / "sub.csv")
    np.testing.assert_allclose(probs_b[list(CLASS_NAMES)].to_numpy(), probs_a[list(CLASS_NAMES)].to_numpy(),
                               atol=1e-5, rtol=0)
    assert sub_b["Predicted"].tolist() == sub_a["Predicted"].tolist()


def test_export_card_and_weights(fake_run: Path, fake_export: Path) -> None:
    from safetensors.torch import load_file

    assert sorted(os.listdir(fake_export)) == ["card.json", "model.safetensors"]
    card = json.loads((fake_export / "card.json").read_text())
    assert card["architecture"] == "resnet18" and card["num_classes"] == 28 and card["class_names"] == list(CLASS_NAMES)
    assert card["channels"] == list(CHANNELS) and card["image_size"] == FAKE_SIZE
    assert card["mean"] == pytest.approx([0.05, 0.06, 0.04, 0.05])
    assert card["std"] == pytest.approx([0.06, 0.1, 0.1, 0.07])
    assert card["thresholds"]["Nucleoli"] == pytest.approx(0.32) and card["ensure_one"] is True
    assert card["source_checkpoint"].endswith("checkpoints/best.ckpt") and "torch" in card["versions"]
    weights = load_file(str(fake_export / "model.safetensors"))
    assert weights["conv1.weight"].shape == (64, 4, 7, 7) and weights["fc.weight"].shape == (28, 512)
    # a checkpoint from before networks recorded their size (a CNN takes any): none, and timm alone rebuilds it
    assert card["img_size"] is None and card["dynamic_img_size"] is False
    assert card["timm_args"] == {"in_chans": 4, "num_classes": 28, "global_pool": "avg"}
    with pytest.raises(InferenceError, match="already exists"):
        export_model(fake_run, fake_export)


def test_a_fixed_size_transformer_predicts_at_its_size_and_refuses_another_in_one_line(
        held_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    module = HPAModule(model={"name": "vit_tiny_patch16_224", "pretrained": False, "img_size": FAKE_SIZE},
                       loss={"_target_": "hpa_lightning.models.losses.FocalLoss", "gamma": 0.2},
                       optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.02})
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, ckpt)
    (run_dir / "results.json").write_text(json.dumps({"status": "completed", "image_size": FAKE_SIZE,
                                                      "best_checkpoint": str(ckpt)}))
    code, _, err = predict(capsys, f"ckpt={run_dir}", f"input={held_out}", "workers=0", f"out={tmp_path / 'a.csv'}")
    assert code == 0, err
    code, _, err = predict(capsys, f"ckpt={run_dir}", f"input={held_out}", "image_size=48",
                           f"out={tmp_path / 'b.csv'}")
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        f"error: image_size=48: {ckpt} (vit_tiny_patch16_224) cannot take 48 px inputs (AssertionError: Input height "
        f"(48) doesn't match model ({FAKE_SIZE})")
    assert not (tmp_path / "b.csv").exists()


def test_ids_without_sample_submission_are_sorted_from_the_files(held_out: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"  # images directly in the input folder, no sample_submission.csv
    flat.mkdir()
    for path in sorted((held_out / "test").iterdir())[:12]:  # the four channels of the first three Ids
        shutil.copy(path, flat / path.name)
    data = resolve_input(flat)
    assert data.image_dir == flat and len(data.ids) == 3 and data.ids == sorted(data.ids)


def test_a_folder_without_sample_submission_predicts_the_complete_ids_and_lists_the_others(
        held_out: Path, fake_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    files = sorted((held_out / "test").iterdir())
    for path in files[:16]:  # four complete Ids
        shutil.copy(path, flat / path.name)
    partial = files[16].name.rsplit("_", 1)[0]
    for path in files[16:19]:  # the fifth Id without its last channel file
        shutil.copy(path, flat / path.name)
    missing_channel = files[19].stem.rsplit("_", 1)[1]
    out = tmp_path / "sub.csv"
    code, stdout, stderr = predict(capsys, f"ckpt={fake_export}", f"input={flat}", f"out={out}")
    assert code == 0, stderr
    submission, _ = read_outputs(out)
    assert len(submission) == 4 and partial not in set(submission["Id"])
    listing = tmp_path / "sub_incomplete.csv"
    assert f"skipped 1 incomplete Ids (not all four channel files), listed in {listing}" in stdout
    listed = pd.read_csv(tmp_path / "sub_incomplete.csv")
    assert listed.to_dict("records") == [{"Id": partial, "missing": missing_channel}]


# ---------------------------------------------------------------------------------------------- safety

class CodeOnLoad:
    """Unpickling this runs code: `exec` creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant_checkpoint(fake_run: Path, target: Path, marker: Path) -> Path:
    checkpoint = torch.load(fake_run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["note"] = CodeOnLoad(marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target


def test_checkpoint_that_runs_code_is_refused(fake_run: Path, held_out: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    # The payload is live: unrestricted unpickling (what a fallback would do) runs it.
    proof = plant_checkpoint(fake_run, tmp_path / "proof.ckpt", tmp_path / "proof_marker")
    torch.load(proof, weights_only=False)
    assert (tmp_path / "proof_marker").exists()

    marker = tmp_path / "pwned"
    evil_run = tmp_path / "evil_run"
    ckpt = plant_checkpoint(fake_run, evil_run / "checkpoints" / "best.ckpt", marker)
    for name in ("results.json", "thresholds.json"):
        shutil.copy(fake_run / name, evil_run / name)
    for source in (evil_run, ckpt):
        code, out, err = predict(capsys, f"ckpt={source}", f"input={held_out}", f"out={tmp_path / 'o' / 's.csv'}")
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"error: refusing to load {ckpt} (not loadable with weights_only=True"), lines[0]
    with pytest.raises(SystemExit) as exit_:
        export_main([f"ckpt={evil_run}", f"out={tmp_path / 'export'}"])
    assert exit_.value.code == 2 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "o").exists() and not (tmp_path / "export").exists()


# ---------------------------------------------------------------------------------------------- bad input

def _copy_input(held_out: Path, root: Path, n: int = 4) -> list[str]:
    ids = pd.read_csv(held_out / "sample_submission.csv", dtype=str)["Id"].tolist()[:n]
    (root / "test").mkdir(parents=True)
    for sample_id in ids:
        for channel in CHANNELS:
            shutil.copy(held_out / "test" / f"{sample_id}_{channel}.png", root / "test")
    write_sample_submission(root, ids)
    return ids


@pytest.mark.parametrize("fault", ["missing_channel", "corrupt_png", "image_bomb", "id_missing",
                                   "no_complete_id_without_csv"])
def test_bad_input_is_one_line_exit_2_and_no_outputs(fault: str, held_out: Path, fake_export: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "input"
    ids = _copy_input(held_out, root)
    victim = root / "test" / f"{ids[2]}_green.png"
    if fault == "missing_channel":
        victim.unlink()
        expected = [str(victim), "missing channel file"]
    elif fault == "corrupt_png":
        victim.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        expected = [str(victim), "cannot decode image"]
    elif fault == "image_bomb":  # a small PNG declaring 20000 x 20000 px: refused from its header, never decoded
        png_declaring(victim, 20000, 20000)
        expected = [str(victim), "20000x20000 px", "max_image_pixels", "refused before decoding"]
    elif fault == "id_missing":
        write_sample_submission(root, [*ids[:2], "ghost-id", *ids[2:]])
        expected = ["sample_submission.csv row 4", "Id ghost-id"]
    else:  # without a sample submission incomplete Ids are listed, not fatal; with none complete there is no work
        (root / "sample_submission.csv").unlink()
        for sample_id in ids:
            (root / "test" / f"{sample_id}_green.png").unlink()
        expected = [str(root / "test"), "no Id has all four channel files", "lacks green"]
    out_dir = tmp_path / "out"
    code, out, err = predict(capsys, f"ckpt={fake_export}", f"input={root}", f"out={out_dir / 'sub.csv'}",
                             "workers=1", "batch_size=2")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(part in lines[0] for part in expected), lines[0]
    assert not out_dir.exists()


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def trained_run(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("predict_runs") / "focal_g02"
    proc = run_module("hpa_lightning.train", ["+experiment=focal_g02", "+preset=tiny", "trainer.max_epochs=1",
                                              f"hydra.run.dir={run_dir}"], shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_trained_run_predicts_from_checkpoint_and_export(trained_run: Path, held_out: Path, shared_cache: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ids = pd.read_csv(held_out / "sample_submission.csv", dtype=str)["Id"].tolist()
    export_model(trained_run, tmp_path / "export")
    proc = run_module("hpa_lightning.predict", [f"ckpt={trained_run}", f"input={held_out}", "tta=4", "workers=2",
                                                f"out={tmp_path / 'from_ckpt.csv'}"], shared_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"at {json.loads((trained_run / 'results.json').read_text())['image_size']}px" in proc.stdout
    code, _, err = predict(capsys, f"ckpt={tmp_path / 'export'}", f"input={held_out}", "tta=4", "workers=0",
                           f"out={tmp_path / 'from_export.csv'}")
    assert code == 0, err
    sub_c, probs_c = read_outputs(tmp_path / "from_ckpt.csv")
    sub_e, probs_e = read_outputs(tmp_path / "from_export.csv")
    check_submission(sub_c, probs_c, ids)
    check_submission(sub_e, probs_e, ids)
    np.testing.assert_allclose(probs_e[list(CLASS_NAMES)].to_numpy(), probs_c[list(CLASS_NAMES)].to_numpy(),
                               atol=1e-5, rtol=0)
    assert sub_e["Predicted"].tolist() == sub_c["Predicted"].tolist()
    card = json.loads((tmp_path / "export" / "card.json").read_text())
    tuned = json.loads((trained_run / "thresholds.json").read_text())
    assert card["thresholds"] == pytest.approx(tuned["thresholds"]) and card["ensure_one"] == tuned["ensure_one"]


def test_a_run_with_catavgmax_pooling_loads_and_exports_with_it(tmp_path: Path) -> None:
    """model.global_pool changes the head's input size: the checkpoint loader and the export card must carry it."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    module = HPAModule(model={"name": "resnet10t", "pretrained": False, "global_pool": "catavgmax"},
                       loss={"_target_": "hpa_lightning.models.losses.FocalLoss", "name": "focal", "gamma": 0.2},
                       optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.02}).eval()
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, ckpt)
    (run_dir / "results.json").write_text(json.dumps({"status": "completed", "image_size": FAKE_SIZE,
                                                      "best_checkpoint": str(ckpt)}))
    x = torch.rand(2, 4, FAKE_SIZE, FAKE_SIZE)
    with torch.no_grad():
        expected = module.net(x)
        for source in (run_dir, export_model(run_dir, tmp_path / "export")):
            loaded = load_model(source)
            assert loaded.global_pool == "catavgmax"
            torch.testing.assert_close(loaded.net(x), expected)
    assert json.loads((tmp_path / "export" / "card.json").read_text())["global_pool"] == "catavgmax"


# ---------------------------------------------------------------------------------------------- crops


def test_crop_views_are_reduced_by_mean_or_max_over_every_window_and_view() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 28, 3), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    x = torch.rand(2, 4, 20, 20)
    windows = [(0, 0), (3, 5), (8, 8)]
    with torch.no_grad():
        views = torch.stack([torch.sigmoid(net(v)) for top, left in windows
                             for w in [x[..., top:top + 12, left:left + 12]] for v in (w, w.flip(-1))])
        torch.testing.assert_close(tta_probabilities(net, x, 2, crops=windows, crop_size=12, reduce="max"),
                                   views.max(dim=0).values)
        torch.testing.assert_close(tta_probabilities(net, x, 2, crops=windows, crop_size=12), views.mean(dim=0))
    assert crop_windows(40, 32, 5) == crop_windows(40, 32, 5)  # the same views in every run
    assert all(0 <= t <= 8 and 0 <= left <= 8 for t, left in crop_windows(40, 32, 50))
    with pytest.raises(InferenceError, match="tta_reduce=median"):
        tta_probabilities(net, x, 1, reduce="median")


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of a model trained on 24 px crops of 32 px images, evaluated on the centre window."""
    run_dir = tmp_path_factory.mktemp("crop") / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    module = HPAModule(model={"name": "resnet10t", "pretrained": False},
                       loss={"_target_": "hpa_lightning.models.losses.FocalLoss", "name": "focal", "gamma": 0.2},
                       optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.02},
                       mean=[0.05, 0.06, 0.04, 0.05], std=[0.06, 0.1, 0.1, 0.07],
                       crop={"size": 24, "eval": "center"})
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, ckpt)
    (run_dir / "results.json").write_text(json.dumps({"status": "completed", "image_size": FAKE_SIZE,
                                                      "best_checkpoint": str(ckpt)}))
    return run_dir


def test_a_model_trained_on_crops_predicts_as_it_was_validated(crop_run: Path, held_out: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from hpa_lightning.inference.predictor import ImageFolderDataset

    model = load_model(crop_run)
    assert model.crop == {"size": 24, "eval": "center"}
    ids = pd.read_csv(held_out / "sample_submission.csv", dtype=str)["Id"].tolist()
    images = torch.stack([ImageFolderDataset(held_out / "test", ids, FAKE_SIZE, "divide")[i]["image"]
                          for i in range(len(ids))])
    with torch.no_grad():
        x = model.standardize(images)
        centre = torch.sigmoid(model.net(x[..., 4:28, 4:28])).numpy()
        windows = crop_windows(FAKE_SIZE, 24, 3)
        crops_max = torch.stack([torch.sigmoid(model.net(x[..., t:t + 24, left:left + 24])) for t, left in windows]
                                ).max(dim=0).values.numpy()
    for args, expected in [([], centre), (["tta_crops=3", "tta_reduce=max"], crops_max)]:
        out = tmp_path / f"sub{len(args)}.csv"
        code, _, err = predict(capsys, f"ckpt={crop_run}", f"input={held_out}", "workers=0", "channels_last=false",
                               f"out={out}", *args)
        assert code == 0, err
        _, probabilities = read_outputs(out)
        np.testing.assert_allclose(probabilities[list(CLASS_NAMES)].to_numpy(), expected, atol=1e-5, rtol=0)
    card = json.loads((export_model(crop_run, tmp_path / "export") / "card.json").read_text())
    assert card["crop"] == {"size": 24, "eval": "center"} and load_model(tmp_path / "export").crop == card["crop"]


def test_crop_views_of_a_model_without_crops_are_one_line(fake_run: Path, held_out: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    code, _, err = predict(capsys, f"ckpt={fake_run}", f"input={held_out}", "tta_crops=2", f"out={tmp_path / 's.csv'}")
    assert code == 2 and err.strip().splitlines() == [f"error: tta_crops=2: {fake_run / 'checkpoints' / 'best.ckpt'}"
                                                      f" was trained without crops (crop.size null)"]


# ---------------------------------------------------------------------------------------------- folds


@pytest.mark.slow
def test_a_fold_sweep_is_reported_and_predicts_as_one_ensemble(shared_cache: Path, held_out: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """+sweep=folds with 3 folds: one test split, val folds that partition train+val; the report adds the ensemble;
    predict ckpt=<sweep> equals the mean of predicting with each fold, decided with out-of-fold thresholds."""
    from hpa_lightning.report import main as report_main
    from hpa_lightning.runs.ensemble import ensemble_evaluation, read_predictions

    sweep = tmp_path / "sweep"
    proc = run_module("hpa_lightning.train", ["-m", "+sweep=folds", "+experiment=focal_g02", "+preset=tiny",
                                              "trainer.max_epochs=1", "data.split.folds=3", "data.split.fold=0,1,2",
                                              f"hydra.sweep.dir={sweep}"], shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(runs) == 3
    tests = [read_predictions(run / "test_predictions.csv")[0] for run in runs]
    vals = [set(read_predictions(run / "val_predictions.csv")[0]) for run in runs]
    assert all(sorted(ids) == sorted(tests[0]) for ids in tests)  # one test split
    assert sum(map(len, vals)) == len(set().union(*vals))  # the val folds do not overlap

    assert report_main([str(sweep)]) == 0
    table = pd.read_csv(sweep / "report" / "results.csv")
    ensemble = table[table["status"] == "ensemble"]
    assert ensemble["label"].tolist() == ["focal_g02 ensemble of 3 folds"]
    evaluation = ensemble_evaluation(runs)
    assert ensemble["test_macro_f1_tuned"].iloc[0] == pytest.approx(evaluation["test"]["macro_f1_tuned"], abs=1e-4)

    singles = []
    for k, run in enumerate(runs):
        code, _, err = predict(capsys, f"ckpt={run}", f"input={held_out}", "workers=0", f"out={tmp_path / f'{k}.csv'}")
        assert code == 0, err
        singles.append(read_outputs(tmp_path / f"{k}.csv")[1][list(CLASS_NAMES)].to_numpy())
    code, out, err = predict(capsys, f"ckpt={sweep}", f"input={held_out}", "workers=0", f"out={tmp_path / 'e.csv'}")
    assert code == 0, err
    assert "out of fold validation predictions of the 3 members" in out
    submission, probabilities = read_outputs(tmp_path / "e.csv")
    mean = np.mean(singles, axis=0)
    np.testing.assert_allclose(probabilities[list(CLASS_NAMES)].to_numpy(), mean, atol=1e-5)
    decided = metrics.decide(mean, np.asarray(evaluation["thresholds"]), ensure_one=evaluation["ensure_one"])
    assert submission["Predicted"].tolist() == [" ".join(str(c) for c in np.flatnonzero(row)) for row in decided]
    # exported as one ensemble folder, the sweep predicts the same
    from hpa_lightning.export import main as export_main

    export_main([f"ckpt={sweep}", f"out={tmp_path / 'folds'}"])
    code, _, err = predict(capsys, f"ckpt={tmp_path / 'folds'}", f"input={held_out}", "workers=0",
                           f"out={tmp_path / 'x.csv'}")
    assert code == 0, err
    exported_submission, exported = read_outputs(tmp_path / "x.csv")
    np.testing.assert_allclose(exported[list(CLASS_NAMES)].to_numpy(), mean, atol=1e-5)
    assert exported_submission["Predicted"].tolist() == submission["Predicted"].tolist()


def test_an_exported_ensemble_predicts_as_its_members(fake_run: Path, crop_run: Path, held_out: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Two runs weighted 3:1: predicting from their exported ensemble equals predicting from the runs themselves
    (probabilities, and decisions with the weighted mean of their thresholds: they have no val predictions)."""
    from hpa_lightning.export import main as export_main

    members = f"{fake_run},{crop_run}"
    export_main([f"ckpt={members}", "weights=3,1", f"out={tmp_path / 'ensemble'}"])
    card = json.loads((tmp_path / "ensemble" / "card.json").read_text())
    assert card["format"] == "hpa_lightning.export-ensemble/1"
    assert [m["weight"] for m in card["members"]] == [0.75, 0.25]
    assert all((tmp_path / "ensemble" / m["folder"] / "model.safetensors").is_file() for m in card["members"])
    capsys.readouterr()
    outputs = {}
    for name, args in (("runs", [f"ckpt={members}", "weights=3,1"]), ("export", [f"ckpt={tmp_path / 'ensemble'}"])):
        code, _, err = predict(capsys, *args, f"input={held_out}", "workers=0", f"out={tmp_path / f'{name}.csv'}")
        assert code == 0, err
        outputs[name] = read_outputs(tmp_path / f"{name}.csv")
    np.testing.assert_allclose(outputs["export"][1][list(CLASS_NAMES)].to_numpy(),
                               outputs["runs"][1][list(CLASS_NAMES)].to_numpy(), atol=1e-5)
    assert outputs["export"][0]["Predicted"].tolist() == outputs["runs"][0]["Predicted"].tolist()
    single = {}
    for run in (fake_run, crop_run):
        code, _, err = predict(capsys, f"ckpt={run}", f"input={held_out}", "workers=0", f"out={tmp_path / 's.csv'}")
        assert code == 0, err
        single[run] = read_outputs(tmp_path / "s.csv")[1][list(CLASS_NAMES)].to_numpy()
    np.testing.assert_allclose(outputs["runs"][1][list(CLASS_NAMES)].to_numpy(),
                               0.75 * single[fake_run] + 0.25 * single[crop_run], atol=1e-5)
