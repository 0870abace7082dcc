"""Crafted checkpoints and run folders, written as an attacker would: no `_target_` outside the allowlist is built.

Each payload reaches a dangerous callable through a prefix the old check trusted (`hpa_lightning.`, `torch.nn.`,
`torch.optim.`), because Hydra resolves dotted names by walking attributes. On every path that builds objects from a
file the result must be a one-line refusal naming the file and the key, and the payload's marker file must not exist.
"""

# Mutation testing (`make mutation`, tests/mutation.py): the mutants of hpa_lightning/targets.py these tests do not
# kill, judged equivalent: `OmegaConf.to_container(node, resolve=None)` or without resolve (the default is False and
# None is falsy). It stays explicit: not resolving a file's interpolations is the point.

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
from hpa_lightning.targets import (
    ALLOWED_TARGETS,
    ENV_TRUST,
    check_targets,
    iter_targets,
    resolve_allowed,
    trust_in_this_process,
    trusted_targets,
)
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
    module = HPAModule.load_from_checkpoint(path, map_location="cpu")
    assert module.hparams.loss["gamma"] == 0.2 and module.hparams.model["pretrained"] is False  # no download


def test_checkpoints_of_the_unreleased_flat_layout_are_refused_in_one_line(good_checkpoint: tuple[Path, dict],
                                                                          tmp_path: Path) -> None:
    """The flat layout (`hpa_lightning.losses.FocalLoss`, `hpa_lightning.model.create_model`) lived one week before
    any release; its names are not read as today's: such a file is refused like any unknown name, naming the key."""
    _, checkpoint = good_checkpoint
    old = {**checkpoint["hyper_parameters"], "loss": {**LOSS, "_target_": "hpa_lightning.losses.FocalLoss"}}
    path = tmp_path / "flat-layout.ckpt"
    torch.save({**checkpoint, "hyper_parameters": old}, path)
    with pytest.raises(UnsafeTargetError) as refused:
        HPAModule.load_from_checkpoint(path, map_location="cpu")
    assert "\n" not in str(refused.value) and "hyper_parameters.loss._target_" in str(refused.value)
    for name in ("hpa_lightning.losses.torch.load", "hpa_lightning.model.os.system"):
        with pytest.raises(UnsafeTargetError):
            resolve_allowed(name, "old")


@pytest.mark.parametrize("node", ["model", "loss", "optimizer", "scheduler"])
@pytest.mark.parametrize("attack", ["torch.load", "Path.write_text", "os.system", "subprocess"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(good_checkpoint: tuple[Path, dict], tmp_path: Path,
                                                        node: str, attack: str) -> None:
    marker = tmp_path / "pwned"
    path = crafted(tmp_path, good_checkpoint[1], node, payloads(marker)[attack])
    with pytest.raises(UnsafeTargetError) as raised:
        HPAModule.load_from_checkpoint(path, map_location="cpu")
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and f"hyper_parameters.{node}._target_" in message
    assert not marker.exists()


@pytest.mark.parametrize("attack", ["torch.load", "os.system"])
def test_inference_and_export_never_instantiate_checkpoint_nodes(good_checkpoint: tuple[Path, dict],
                                                                 tmp_path: Path, attack: str) -> None:
    from hpa_lightning.inference.export_folder import export_model

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
                                "torch.optim.Adam", "hpa_lightning.runs.hydra_callbacks.ReportPendingJobs",
                                "hpa_lightning.reporting.wandb_sweep_end.SweepDashboard"}
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


# ---------------------------------------------------------------------------------- the check's parts, exactly


def test_trusted_names_come_from_the_environment_and_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_TRUST, " a.B , c.D,,a.B ")
    assert trusted_targets() == ("a.B", "c.D")  # stripped, empty entries and repeats dropped, order kept
    assert trusted_targets("e.F, c.D") == ("a.B", "c.D", "e.F")
    assert trusted_targets(["g.H ", " "]) == ("a.B", "c.D", "g.H")
    monkeypatch.delenv(ENV_TRUST)
    assert trusted_targets() == ()
    trust_in_this_process("")
    assert ENV_TRUST not in os.environ
    trust_in_this_process("x.Y, a.B")
    trust_in_this_process("a.B,z.W")
    assert os.environ[ENV_TRUST] == "x.Y,a.B,z.W"  # what the jobs this process starts inherit


def test_a_trusted_name_that_does_not_import_is_one_line_with_the_reason(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason is the import's own error (Hydra wraps it in a three-line ImportError; before, only its first
    line, "Error loading 'x':", reached the user)."""
    (tmp_path / "broken_user_module.py").write_text("raise RuntimeError()\n")
    (tmp_path / "user_module.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for trusted, reason in (("no_such_user_module.Loss", "ModuleNotFoundError: No module named 'no_such_user_module'"),
                            ("broken_user_module.Loss", "RuntimeError: no message"),
                            ("user_module.Loss", "ModuleNotFoundError: No module named 'user_module.Loss'; "
                                                 "'user_module' is not a package")):
        with pytest.raises(UnsafeTargetError) as raised:
            resolve_allowed("torch.optim.sgd.SGD", "w", trust=(trusted,))  # an alias: the trusted names resolve
        assert str(raised.value) == f"trust={trusted}: cannot import it ({reason})"


def test_resolve_allowed_returns_the_name_it_stands_for_or_refuses_in_one_line() -> None:
    assert resolve_allowed("hpa_lightning.models.losses.FocalLoss", "w") == "hpa_lightning.models.losses.FocalLoss"
    assert resolve_allowed("json.decoder.JSONDecoder", "w", trust=["json.decoder.JSONDecoder"]) == (
        "json.decoder.JSONDecoder")
    assert resolve_allowed("json.JSONDecoder", "w", trust=("json.decoder.JSONDecoder",)) == "json.decoder.JSONDecoder"
    with pytest.raises(UnsafeTargetError) as raised:
        resolve_allowed(3, "ckpt: loss._target_")
    assert str(raised.value) == "ckpt: loss._target_: _target_ must be a dotted name, got int"
    for name, trust in (("json.loads", ("json.decoder.JSONDecoder",)), ("torch.nope.Thing", ()), ("os.system", ()),
                        ("torch.optim.SGD.step", ())):
        with pytest.raises(UnsafeTargetError) as raised:
            resolve_allowed(name, "ckpt: loss._target_", trust)
        assert str(raised.value) == (
            f"ckpt: loss._target_: _target_ {name!r} is not one of the callables hpa_lightning builds; refusing to "
            f"build it (if you trust this file, pass trust={name} or set HPA_TRUST_TARGETS={name})")


def test_iter_targets_walks_omegaconf_containers_unresolved() -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.create({"loss": {"_target_": "${oc.env:TARGET}", "inner": [{"_target_": "a.B"}, 1]},
                             "aug": ({"_target_": "c.D"},), "name": "_target_"})
    assert list(iter_targets(node, "hyper_parameters")) == [("hyper_parameters.loss._target_", "${oc.env:TARGET}"),
                                                            ("hyper_parameters.loss.inner[0]._target_", "a.B"),
                                                            ("hyper_parameters.aug[0]._target_", "c.D")]
    assert list(iter_targets([{"_target_": "x.Y"}, ({"k": {"_target_": "z.W"}},)])) == [
        ("[0]._target_", "x.Y"), ("[1][0].k._target_", "z.W")]


@pytest.mark.parametrize("container", [False, True])
def test_an_interpolated_target_is_refused_even_when_trusted(monkeypatch: pytest.MonkeyPatch,
                                                             container: bool) -> None:
    """Hydra would resolve `${oc.env:TARGET}` only when building, to whatever the environment says then: the check
    never resolves it, refuses it in an OmegaConf container as in a dict, and never offers (or accepts) trusting
    it (before, its refusal read "pass trust=${oc.env:TARGET}", and that trust let it through)."""
    from omegaconf import OmegaConf

    monkeypatch.setenv("TARGET", "torch.optim.SGD")  # resolved, it would be an allowed name
    tree = {"loss": {"_target_": "${oc.env:TARGET}"}}
    node = OmegaConf.create(tree) if container else tree
    for trust in ((), ("${oc.env:TARGET}",)):
        with pytest.raises(UnsafeTargetError) as raised:
            check_targets(node, "run/.hydra/config.yaml", trust=trust)
        assert str(raised.value) == ("run/.hydra/config.yaml: loss._target_: _target_ '${oc.env:TARGET}' is not a "
                                     "dotted name; refusing to build it (a file's _target_ is never resolved)")


def test_every_refused_target_is_named_in_one_line_with_the_trust_that_accepts_the_dotted_ones() -> None:
    tree = {"loss": {"_target_": "mylosses.Asym"}, "callbacks": [{"_target_": "${x}"}, {"_target_": "os.system"}],
            "optimizer": {"_target_": "torch.optim.SGD"}, "other": {"_target_": "mylosses.Asym"}}
    with pytest.raises(UnsafeTargetError) as raised:
        check_targets(tree, "run.yaml")
    assert str(raised.value) == (
        "run.yaml: 4 _target_s are not among the callables hpa_lightning builds: loss._target_ 'mylosses.Asym', "
        "callbacks[0]._target_ '${x}', callbacks[1]._target_ 'os.system', other._target_ 'mylosses.Asym'; refusing "
        "to build them (if you trust this file, pass trust=mylosses.Asym,os.system or set "
        "HPA_TRUST_TARGETS=mylosses.Asym,os.system)")
    with pytest.raises(UnsafeTargetError) as raised:
        check_targets({"a": {"_target_": "${x}"}, "b": [{"_target_": 7}]}, "run.yaml", key="cfg")
    assert str(raised.value) == ("run.yaml: 2 _target_s are not among the callables hpa_lightning builds: "
                                 "cfg.a._target_ '${x}', cfg.b[0]._target_ 7; refusing to build them")
    with pytest.raises(UnsafeTargetError, match=r"callbacks\[0\]\._target_: _target_ '\$\{x\}' is not a dotted"):
        check_targets(tree, "run.yaml", trust=["mylosses.Asym", "os.system"])  # the one left, alone


