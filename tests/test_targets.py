"""Crafted checkpoints and run folders, written as an attacker would: no `_target_` outside the allowlist is built.

Each payload reaches a dangerous callable through a prefix the old check trusted (`hpa_lightning.`, `torch.nn.`,
`torch.optim.`), because Hydra resolves dotted names by walking attributes. On every path that builds objects from a
file the result must be a one-line refusal naming the file and the key, and the payload's marker file must not exist.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hpa_lightning.errors import UnsafeTargetError
from hpa_lightning.inference.load import load_model
from hpa_lightning.models.module import HPAModule
from hpa_lightning.targets import ALLOWED_TARGETS, check_targets, iter_targets, resolve_allowed
from tests.conftest import REPO

MODEL = {"name": "resnet18", "pretrained": False}
LOSS = {"_target_": "hpa_lightning.models.losses.FocalLoss", "name": "focal", "gamma": 0.2}
OPTIMIZER = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}


class _RunShell:
    """Unpickling this runs a shell command: what `torch.load(weights_only=False)` would do with the payload."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def payloads(marker: Path) -> dict[str, dict]:
    """Loss nodes that, instantiated by Hydra, write `marker`; each passes a plain prefix test."""
    pickled = pickle.dumps(_RunShell(f"touch {marker}"))
    return {
        "torch.load": {"_target_": "torch.nn.functional.torch.load", "weights_only": False,
                       "f": {"_target_": "torch.nn.functional.torch.serialization.io.BytesIO", "_args_": [pickled]}},
        "Path.write_text": {"_target_": "hpa_lightning.data.store.Path.write_text",
                            "_args_": [{"_target_": "hpa_lightning.data.store.Path", "_args_": [str(marker)]},
                                       "pwned"]},
        "os.system": {"_target_": "hpa_lightning.data.store.os.system", "_args_": [f"touch {marker}"]},
        "subprocess": {"_target_": "hpa_lightning.runs.rerun.subprocess.call", "_args_": [["touch", str(marker)]]},
    }


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    module = HPAModule(model=MODEL, loss=LOSS, optimizer=OPTIMIZER, mean=[0.1] * 4, std=[0.2] * 4)
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                  "pytorch-lightning_version": "2.6.6"}
    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    torch.save(checkpoint, path)
    return path, checkpoint


def crafted(tmp_path: Path, checkpoint: dict, node: str, payload: dict) -> Path:
    hparams = {**checkpoint["hyper_parameters"], node: payload}
    path = tmp_path / f"evil-{node}.ckpt"
    torch.save({**checkpoint, "hyper_parameters": hparams}, path)
    torch.load(path, weights_only=True)  # the file itself is "safe": the attack is in what gets instantiated
    return path


def test_good_checkpoint_loads_both_ways(good_checkpoint: tuple[Path, dict]) -> None:
    path, _ = good_checkpoint
    assert HPAModule.from_checkpoint(path).hparams.loss["gamma"] == 0.2
    assert HPAModule.load_from_checkpoint(path, map_location="cpu").hparams.loss["gamma"] == 0.2


def test_checkpoints_of_the_flat_layout_still_load(good_checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    """Checkpoints written before the package had subpackages name `hpa_lightning.losses.FocalLoss`,
    `hpa_lightning.schedulers.*` and `hpa_lightning.model.create_model`: they load, and are saved again under the
    current names; a path through an old name to anything else stays refused."""
    _, checkpoint = good_checkpoint
    old = {**checkpoint["hyper_parameters"],
           "model": {"_target_": "hpa_lightning.model.create_model", **MODEL},
           "loss": {**LOSS, "_target_": "hpa_lightning.losses.FocalLoss"},
           "scheduler": {"_target_": "hpa_lightning.schedulers.sgdr", "_partial_": True, "name": "sgdr",
                         "cycle": 1.0, "cycle_mult": 2.0}}
    path = tmp_path / "flat-layout.ckpt"
    torch.save({**checkpoint, "hyper_parameters": old}, path)
    for module in (HPAModule.from_checkpoint(path), HPAModule.load_from_checkpoint(path, map_location="cpu")):
        assert module.hparams.loss["_target_"] == "hpa_lightning.models.losses.FocalLoss"
        assert module.hparams.scheduler["_target_"] == "hpa_lightning.models.schedulers.sgdr"
        assert module.hparams.model["_target_"] == "hpa_lightning.models.net.create_model"
        assert type(module.criterion).__name__ == "FocalLoss" and module.criterion.gamma == pytest.approx(0.2)
        assert torch.equal(module.state_dict()["net.fc.weight"], checkpoint["state_dict"]["net.fc.weight"])
    (tmp_path / "results.json").write_text('{"image_size": 32}')
    assert load_model(path).architecture == "resnet18"
    for name in ("hpa_lightning.losses.torch.load", "hpa_lightning.losses.FocalLoss.__init__.__globals__",
                 "hpa_lightning.model.os.system"):
        with pytest.raises(UnsafeTargetError):
            resolve_allowed(name, "old")


@pytest.mark.parametrize("loader", ["from_checkpoint", "load_from_checkpoint"])
@pytest.mark.parametrize("node", ["model", "loss", "optimizer", "scheduler"])
@pytest.mark.parametrize("attack", ["torch.load", "Path.write_text", "os.system", "subprocess"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(good_checkpoint: tuple[Path, dict], tmp_path: Path,
                                                        loader: str, node: str, attack: str) -> None:
    marker = tmp_path / "pwned"
    path = crafted(tmp_path, good_checkpoint[1], node, payloads(marker)[attack])
    with pytest.raises(UnsafeTargetError) as raised:
        getattr(HPAModule, loader)(path, map_location="cpu")
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and f"hyper_parameters.{node}._target_" in message
    assert not marker.exists()


@pytest.mark.parametrize("attack", ["torch.load", "os.system"])
def test_inference_and_export_never_instantiate_checkpoint_nodes(good_checkpoint: tuple[Path, dict],
                                                                 tmp_path: Path, attack: str) -> None:
    from hpa_lightning.inference.export import export_model

    marker = tmp_path / "pwned"
    path = crafted(tmp_path, good_checkpoint[1], "loss", payloads(marker)[attack])
    (tmp_path / "results.json").write_text('{"image_size": 32}')  # the run folder's facts that export needs
    model = load_model(path)  # predict's loader: rebuilds the timm network from its name, weights only
    assert model.architecture == "resnet18"
    export_model(path, tmp_path / "export")
    assert not marker.exists()


def test_aliases_of_allowed_callables_resolve_and_lookalikes_do_not() -> None:
    assert resolve_allowed("torch.optim.sgd.SGD", "x") == "torch.optim.SGD"  # the same class by another path
    for name in ("torch.nn.functional.torch.load", "hpa_lightning.models.losses.torch.load", "os.system",
                 "builtins.eval", "torch.optim.SGD.__init__",
                 "hpa_lightning.models.losses.FocalLoss.__init__.__globals__"):
        with pytest.raises(UnsafeTargetError):
            resolve_allowed(name, "x")
    with pytest.raises(UnsafeTargetError, match="interp"):
        check_targets({"loss": {"_target_": "${oc.env:TARGET}"}}, "interp")


def conf_targets() -> set[str]:
    found = set()
    for path in (REPO / "conf").rglob("*.yaml"):
        if "hydra" in path.relative_to(REPO / "conf").parts or path.parent.name == "sweep":
            continue  # Hydra's own launcher and sweeper nodes are built by Hydra from the command line
        found |= {str(target) for _, target in iter_targets(yaml.safe_load(path.read_text()) or {})}
    return found


def test_allowlist_is_exactly_what_the_configs_name() -> None:
    shipped = conf_targets() | {"hpa_lightning.runs.hydra_callbacks.ControllerHydraConfig",
                                "hpa_lightning.models.losses.bce_loss",
                                "torch.optim.Adam", "hpa_lightning.runs.hydra_callbacks.ReportPendingJobs"}
    assert shipped == set(ALLOWED_TARGETS)
    for name in ALLOWED_TARGETS:
        assert resolve_allowed(name, "conf") == name


def write_failed_run(run_dir: Path, overrides: list[str]) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / "checkpoints").mkdir()


def run_module(module: str, args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HPA_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("attack", ["os.system", "subprocess"])
def test_resume_of_a_crafted_run_folder_is_refused(tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "pwned"
    payload = payloads(marker)[attack]
    args = ",".join(repr(a) if isinstance(a, str) else str(a) for a in payload["_args_"])
    run_dir = tmp_path / "run"
    write_failed_run(run_dir, ["+experiment=focal_g02", "+preset=tiny",
                               f"+callbacks.evil._target_={payload['_target_']}", f"+callbacks.evil._args_=[{args}]"])
    proc = run_module("hpa_lightning.resume", [str(run_dir)], tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "overrides.yaml" in error[0] and "callbacks.evil._target_" in error[0]
    assert not marker.exists()


def test_rerun_of_a_crafted_job_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    job = tmp_path / "sweep" / "0"
    write_failed_run(job, ["+experiment=focal_g02", "+preset=tiny",
                           "+callbacks.evil._target_=hpa_lightning.data.store.os.system",
                           f"+callbacks.evil._args_=['touch {marker}']"])
    (job / "status.json").write_text('{"status": "failed", "error": "x"}')
    proc = run_module("hpa_lightning.rerun_failed", [str(tmp_path / "sweep")], tmp_path / "cache")
    assert proc.returncode != 0
    log = (tmp_path / "sweep" / "0_rerun1" / "rerun_output.log").read_text()
    assert "callbacks.evil._target_" in log and "not one of the callables" in log
    assert not marker.exists()

    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"name": "../evil"}}}))
    proc = run_module("hpa_lightning.rerun_failed", [str(tmp_path / "sweep")], tmp_path / "cache")
    assert proc.returncode == 2 and "hydra.job.name '../evil'" in proc.stderr
