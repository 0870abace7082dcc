"""The sweep's W&B workspace (hpa_lightning.dashboard): swept keys from Hydra's files, a real offline W&B multirun
whose runs log every key a panel names, the spec written offline and read back, and `save=true` against a stub W&B
server on 127.0.0.1 (nothing else contacted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hpa_lightning.runs import swept
from tests.conftest import REPO, run_train
from tests.reporting.wandb_stub import StubServer

USER_SWEEP = ["optimizer.lr=0.01,0.02", "loss=bce,focal"]


def sweeper_params(name: str) -> dict:
    return dict(OmegaConf.load(REPO / "conf" / "sweep" / f"{name}.yaml").hydra.sweeper.params)


@pytest.mark.parametrize(("name", "keys"), [("poster", ["experiment"]), ("lr", ["optimizer.lr"]),
                                            ("optuna", ["optimizer.lr", "loss.gamma"]),
                                            ("folds", ["data.split.fold"])])
def test_swept_keys_of_the_shipped_sweeps(name: str, keys: list[str]) -> None:
    task = ["+preset=tiny", f"+sweep={name}", "trainer.max_epochs=1"]
    assert swept.swept_keys(task, sweeper_params(name)) == keys


def test_swept_keys_of_a_users_sweep_and_the_arms() -> None:
    task = ["+preset=tiny", *USER_SWEEP, "seed=1,2", "trainer.max_epochs=1", "model=resnet18"]
    keys = swept.swept_keys(task, {})
    assert keys == ["optimizer.lr", "loss", "seed"]
    values = swept.job_values(["+preset=tiny", "optimizer.lr=0.02", "loss=focal", "seed=2", "model=resnet18"], keys)
    assert values == {"optimizer.lr": "0.02", "loss": "focal", "seed": "2"}
    assert swept.arm_of(values) == "optimizer.lr=0.02,loss=focal"  # the seed repeats an arm
    assert swept.tags_of(values) == ["optimizer.lr=0.02", "loss=focal", "seed=2"]
    folds = swept.job_values(["+sweep=folds", "data.split.fold=3"], ["data.split.fold"])
    assert swept.arm_of(folds) == "all" and swept.arm_of({"k": "v" * 100}) == ("k=" + "v" * 100)[:64]
    poster = swept.job_values(["+sweep=poster", "+experiment=bce_sgdr"], ["experiment"])
    assert swept.arm_of(poster) == "experiment=bce_sgdr"


# ---- end to end: one real multirun, offline W&B, shared by the assertions below ----

@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("dashboard") / "sweep"
    proc = run_train(["-m", "+preset=tiny", "data.synthetic.n=120", "data.image_size=24", "trainer.max_epochs=1",
                      "logger=wandb", *USER_SWEEP, f"hydra.sweep.dir={folder}"], shared_cache, REPO,
                     extra_env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder, proc


@pytest.fixture(scope="module")
def runs(sweep) -> dict[str, dict]:
    """Each job's offline run as W&B recorded it (its run file decoded with wandb's own record schema)."""
    from hpa_lightning.reporting.wandb_run import offline_runs, read_offline_run

    folder, _ = sweep
    found = {}
    for job in sorted(p for p in folder.iterdir() if (p / ".hydra").is_dir()):
        [run] = offline_runs(job)
        found[job.name] = read_offline_run(run, wait_s=60)
    assert len(found) == 4
    return found


@pytest.fixture(scope="module")
def spec(sweep, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder, _ = sweep
    out = tmp_path_factory.mktemp("spec") / "ws.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, "-m", "hpa_lightning.dashboard", str(folder), f"out={out}"], cwd=REPO,
                          env={**env, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"path": out, "text": out.read_text().strip(), "json": json.loads(out.read_text())}


def panels(spec_json: dict) -> list[dict]:
    return [p for s in spec_json["section"]["panelBankConfig"]["sections"] for p in s["panels"]]


def config_value(config: dict, accessor: str):
    """`config:optimizer.value.lr` (wandb-workspaces' accessor of a nested config key) in a run's logged config."""
    node = config
    for part in accessor.removeprefix("config:").replace(".value.", ".").split("."):
        node = node[part]
    return node


@pytest.mark.slow
def test_runs_group_by_sweep_and_arm(sweep, runs) -> None:
    folder, proc = sweep
    assert {r["group"] for r in runs.values()} == {folder.name}
    arms = {r["job_type"] for r in runs.values()}
    assert arms == {f"optimizer.lr={lr},loss={loss}" for lr in ("0.01", "0.02") for loss in ("bce", "focal")}
    for run in runs.values():
        lr, loss = run["job_type"].split(",")
        assert run["tags"] == ["default", lr, loss] and run["exit_code"] == 0
        assert run["config"]["optimizer"]["lr"] == float(lr.split("=")[1])
        assert run["config"]["choices"]["loss"] == loss.split("=")[1]


@pytest.mark.slow
def test_the_sweep_end_writes_the_offline_spec_and_says_how_to_publish(sweep, spec) -> None:
    folder, proc = sweep
    written = folder / "wandb_workspace.json"
    assert json.loads(written.read_text()) == spec["json"]  # the same workspace as the command's
    assert f"wandb sync {folder}/*/wandb/offline-run-*" in proc.stdout
    assert f"python -m hpa_lightning.dashboard {folder} save=true" in proc.stdout


@pytest.mark.slow
def test_the_panels_name_only_logged_keys(spec, runs) -> None:
    found = panels(spec["json"])
    lines = [p["config"] for p in found if p["viewType"] == "Run History Line Plot"]
    by_metric = {c["metrics"][0]: c for c in lines}
    assert {"val/macro_f1", "val/loss"} <= set(by_metric) and any(m.startswith("lr/") for m in by_metric)
    for config in lines:
        assert config["groupBy"] == "jobType" and config["groupAgg"] == "mean" and config["groupArea"] == "minmax"
        assert config["xAxis"] == "epoch"
    [parallel] = [p["config"] for p in found if p["viewType"] == "Parallel Coordinates Plot"]
    accessors = [c["accessor"] for c in parallel["columns"]]
    assert accessors[:3] == ["config:optimizer.value.lr", "config:choices.value.loss", "summary:val/macro_f1"]
    assert all(a.startswith("summary:test/") for a in accessors[3:]) and len(accessors) > 3
    [importance] = [p["config"] for p in found if p["viewType"] == "Parameter Importance"]
    assert importance["targetKey"] == "val/macro_f1"
    assert [p["config"]["diffOnly"] for p in found if p["viewType"] == "Run Comparer"] == ["split"]
    [runset] = spec["json"]["section"]["runSets"]
    [group_filter] = runset["filters"]["filters"]
    assert group_filter["key"] == {"section": "run", "name": "group"} and group_filter["op"] == "="
    assert group_filter["value"] == next(iter(runs.values()))["group"]
    for run in runs.values():  # every key a panel names, in every run
        history_keys = set().union(*run["history"])
        for metric, config in by_metric.items():
            assert metric in history_keys and config["xAxis"] in history_keys, metric
        for accessor in accessors:
            if accessor.startswith("summary:"):
                assert isinstance(run["summary"][accessor.removeprefix("summary:")], (int, float)), accessor
            else:
                config_value(run["config"], accessor)
        assert any("results/per_class" in m for m in run["media"])
    for accessor in accessors[:2]:  # the axes tell the arms apart
        assert len({str(config_value(r["config"], accessor)) for r in runs.values()}) == 2


@pytest.mark.slow
def test_the_spec_builds_back_to_itself(spec) -> None:
    from hpa_lightning.reporting.wandb_dashboard import spec_json, workspace_from_spec

    rebuilt = workspace_from_spec(spec["text"], entity="someone", project="hpa_lightning")
    assert spec_json(rebuilt) == spec["text"]


AUDIT = '''import os, sys
_log = os.environ["HPA_TEST_CONNECT_LOG"]
def _hook(event, args):
    if event == "socket.connect":
        with open(_log, "a") as f:
            f.write(repr(args[1]) + "\\n")
sys.addaudithook(_hook)
'''


@pytest.mark.slow
def test_save_sends_one_upsert_of_the_dumped_spec_to_the_server_only(sweep, tmp_path: Path) -> None:
    folder, _ = sweep
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(AUDIT)
    connects = tmp_path / "connects.log"
    out = tmp_path / "ws.json"
    with StubServer() as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
        env.update(WANDB_BASE_URL=server.url, WANDB_API_KEY="0123456789abcdef" * 2 + "01234567",
                   WANDB_MODE="online", WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), HOME=str(tmp_path),
                   HTTP_PROXY=server.url, HTTPS_PROXY=server.url, NO_PROXY="127.0.0.1",
                   PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{REPO}", HPA_TEST_CONNECT_LOG=str(connects))
        proc = subprocess.run([sys.executable, "-m", "hpa_lightning.dashboard", str(folder), "entity=team-a",
                               f"out={out}", "save=true"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    upserts = server.operations("upsertView")
    assert len(upserts) == 1
    variables = upserts[0]["variables"]
    assert variables["spec"] == out.read_text().strip()
    assert variables["entityName"] == "team-a" and variables["projectName"] == "hpa_lightning"
    assert f"W&B workspace: {server.url}/team-a/hpa_lightning?nw=" in proc.stdout
    port = int(server.url.rsplit(":", 1)[1])
    assert {r["host"] for r in server.requests} == {f"127.0.0.1:{port}"}  # no proxied request for another host
    addresses = {line.strip() for line in connects.read_text().splitlines()}
    assert addresses and all(a.startswith(("('127.0.0.1',", "'/")) for a in addresses), addresses


def test_dashboard_without_a_sweep_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    proc = subprocess.run([sys.executable, "-m", "hpa_lightning.dashboard", str(tmp_path / "run"), "out=x.json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "multirun.yaml: not found" in proc.stderr


@pytest.mark.slow
def test_report_wandb_publishes_the_comparison_as_a_report(sweep, tmp_path: Path) -> None:
    """The report of item 4 cannot be built offline (wandb-workspaces looks the project up): against the stub."""
    folder, _ = sweep
    with StubServer() as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
        env.update(WANDB_BASE_URL=server.url, WANDB_API_KEY="0123456789abcdef" * 2 + "01234567", WANDB_MODE="online",
                   WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), HOME=str(tmp_path), WANDB_ENTITY="team-a")
        proc = subprocess.run([sys.executable, "-m", "hpa_lightning.report", str(folder), f"out={tmp_path / 'rep'}",
                               "wandb=true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [upsert] = server.operations("upsertView")
    variables = upsert["variables"]
    assert variables["type"] == "runs" and variables["entityName"] == "team-a"
    spec = variables["spec"]
    table = (tmp_path / "rep" / "report.md").read_text()
    assert json.dumps(table)[1:200] in spec  # the comparison table, as Markdown
    assert spec.count("data:image/png;base64,") == len(list((tmp_path / "rep").glob("*.png")))
    assert folder.name in spec and "W&B report: " in proc.stdout


@pytest.mark.slow
def test_a_sweep_with_a_failed_job_still_gets_its_dashboard(tmp_path: Path, shared_cache: Path) -> None:
    """Hydra's sweeper raises the failed job's error after the sweep, before on_multirun_end: the dashboard is made
    as the process exits, and the sweep still fails."""
    folder = tmp_path / "sweep"
    proc = run_train(["-m", "+preset=tiny", "data.synthetic.n=120", "data.image_size=24", "trainer.max_epochs=1",
                      "logger=wandb", "optimizer.lr=0.01,-1", f"hydra.sweep.dir={folder}"], shared_cache, REPO,
                     extra_env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "Invalid learning rate" in proc.stdout + proc.stderr
    written = json.loads((folder / "wandb_workspace.json").read_text())
    assert "optimizer.lr" in json.dumps(written)
    assert f"python -m hpa_lightning.dashboard {folder} save=true" in proc.stdout
