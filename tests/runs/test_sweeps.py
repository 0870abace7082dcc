"""Sweeps: the named sweep configs, sweep folders that never collide, one GPU per job, failure isolation, reruns.

The end-to-end part runs ONE small multirun (3 tiny jobs, one with a divergent LR) through the `gpu_pool` launcher
with 2 simulated GPUs and W&B offline, then relaunches its failed job with `hpa_lightning.rerun_failed`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from hpa_lightning.runs import gpus
from hpa_lightning.runs.find import failed_jobs, find_jobs
from hpa_lightning.runs.rerun import merge_overrides
from hpa_lightning.runs.status import write_status
from tests.conftest import REPO, compose_config

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


# ------------------------------------------------------------------------------------------ sweep definitions


def test_sweep_definitions_live_in_sweeps_and_compose_from_any_cwd(tmp_path: Path, monkeypatch) -> None:
    assert (REPO / "conf" / "sweep").resolve() == (REPO / "sweeps").resolve()
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["+sweep=poster"])
    assert set(cfg.hydra.sweeper.params["+experiment"].split(",")) == set(EXPERIMENTS)
    assert len(EXPERIMENTS) == 10
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    assert "%f" in OmegaConf.to_container(cfg.hydra.sweep)["dir"]  # microseconds: no collisions

    cfg = compose_config(["+sweep=lr", "+experiment=focal_g02"])
    grid = [float(v) for v in cfg.hydra.sweeper.params["optimizer.lr"].split(",")]
    assert len(grid) >= 4 and grid == sorted(grid)
    assert cfg.experiment_name == "focal_g02"


def test_optuna_sweep_maximises_val_f1_over_lr_and_gamma(monkeypatch) -> None:
    monkeypatch.setenv("HPA_NUM_GPUS", "3")
    cfg = compose_config(["+sweep=optuna", "hydra/launcher=gpu_pool"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"optimizer.lr", "loss.gamma"}
    assert "log" in sweeper.params["optimizer.lr"] and "interval" in sweeper.params["loss.gamma"]
    assert sweeper.n_jobs == 3 and sweeper.max_failure_rate > 0  # trials per batch = GPUs; a diverged trial is ok
    assert cfg.loss._target_ == "hpa_lightning.models.losses.FocalLoss"


def test_launchers(monkeypatch) -> None:
    monkeypatch.delenv("HPA_NUM_GPUS", raising=False)
    monkeypatch.delenv("HPA_SIMULATE_GPUS", raising=False)
    assert compose_config(["hydra/launcher=gpu_pool"]).hydra.launcher.n_jobs == 1
    monkeypatch.setenv("HPA_NUM_GPUS", "4")
    launcher = compose_config(["hydra/launcher=gpu_pool"]).hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 4
    slurm = compose_config(["hydra/launcher=slurm"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert slurm.gpus_per_node == 1 and slurm.tasks_per_node == 1 and slurm.nodes == 1
    assert slurm.timeout_min > 0 and slurm.max_num_timeout >= 1
    assert compose_config([]).hydra.launcher._target_.endswith("BasicLauncher")  # plain CPU multirun by default


def test_slurm_launcher_asks_for_requeue_in_the_real_sbatch_script(tmp_path: Path) -> None:
    """submitit writes the script SLURM runs: `--requeue` must be in it (JobRequeue=0 clusters refuse otherwise)."""
    from submitit.slurm.slurm import _make_sbatch_string

    slurm = compose_config(["hydra/launcher=slurm"]).hydra.launcher
    script = _make_sbatch_string(command="true", folder=str(tmp_path), nodes=slurm.nodes,
                                 additional_parameters=dict(slurm.additional_parameters))
    assert "#SBATCH --requeue" in script.splitlines()


def test_multi_node_override_of_the_readme_composes() -> None:
    for trainer in ("default", "ddp", "gpu"):
        cfg = compose_config([f"trainer={trainer}", "trainer.num_nodes=2", "trainer.devices=4"])
        assert cfg.trainer.num_nodes == 2


def test_job_info_for_status_json_carries_the_slurm_ids(tmp_path: Path, monkeypatch) -> None:
    from hpa_lightning.runs.status import _hydra_job_info

    for name, value in {"SLURM_JOB_ID": "1234", "SLURM_ARRAY_JOB_ID": "1200", "SLURM_ARRAY_TASK_ID": "3"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert _hydra_job_info() == {"slurm_job_id": "1234", "slurm_array_job_id": "1200", "slurm_array_task_id": "3"}


# --------------------------------------------------------------------------------------------- GPU claiming

CLAIM_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from hpa_lightning.runs.gpus import claim_gpu
    lock_dir, out, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with claim_gpu(2, lock_dir, poll_s=0.05) as claim:
        start = time.time()
        time.sleep(hold)
        end = time.time()
    json.dump({"index": claim.index, "start": start, "end": end, "simulated": claim.simulated}, open(out, "w"))
""")


def overlapping_pairs_share_a_gpu(intervals: list[tuple[int, float, float]]) -> list:
    bad = []
    for i, (gpu_a, start_a, end_a) in enumerate(intervals):
        for gpu_b, start_b, end_b in intervals[i + 1:]:
            if gpu_a == gpu_b and start_a < end_b and start_b < end_a:
                bad.append(((gpu_a, start_a, end_a), (gpu_b, start_b, end_b)))
    return bad


def test_concurrent_jobs_never_share_a_simulated_gpu(tmp_path: Path) -> None:
    script = tmp_path / "claim.py"
    script.write_text(CLAIM_SCRIPT)
    env = {**os.environ, "HPA_SIMULATE_GPUS": "2", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "locks"), str(tmp_path / f"{i}.json"),
                               "1.0"], env=env) for i in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    records = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(4)]
    assert all(r["simulated"] for r in records)
    assert {r["index"] for r in records} == {0, 1}
    intervals = [(r["index"], r["start"], r["end"]) for r in records]
    assert not overlapping_pairs_share_a_gpu(intervals)
    # 4 jobs of 1 s on 2 GPUs: two rounds, so the claims did wait for each other
    assert max(r["end"] for r in records) - min(r["start"] for r in records) >= 1.9


def test_claim_sets_and_restores_cuda_visible_devices(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.delenv("HPA_SIMULATE_GPUS", raising=False)
    monkeypatch.setattr(gpus, "_pinned", None)
    blocker = gpus._try_lock(tmp_path / "gpu4.lock")  # another job holds physical GPU 4
    try:
        with gpus.claim_gpu(2, tmp_path, poll_s=0.01) as claim:
            assert (claim.index, claim.device, claim.simulated) == (1, "5", False)
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "5" and os.environ["HPA_CLAIMED_GPU"] == "1"
    finally:
        os.close(blocker)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5" and "HPA_CLAIMED_GPU" not in os.environ
    with pytest.raises(ValueError, match="lists 2"):
        with gpus.claim_gpu(3, tmp_path):
            pass


def test_claim_waits_and_times_out_when_all_gpus_are_busy(tmp_path: Path) -> None:
    with gpus.claim_gpu(1, tmp_path, simulate=True) as first:
        assert first.index == 0
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no free GPU"):
            with gpus.claim_gpu(1, tmp_path, poll_s=0.05, timeout_s=0.3, simulate=True):
                pass
        assert time.monotonic() - started >= 0.3
    with gpus.claim_gpu(1, tmp_path, timeout_s=0, simulate=True) as again:  # released: free at once
        assert again.index == 0


def test_pool_size_per_launcher(monkeypatch) -> None:
    for name in ("HPA_NUM_GPUS", "HPA_SIMULATE_GPUS"):
        monkeypatch.delenv(name, raising=False)
    assert gpus.job_pool_size("basic", None) == 0  # plain runs: Lightning picks the device
    assert gpus.job_pool_size("gpu_pool", 4) == 4
    monkeypatch.setenv("HPA_NUM_GPUS", "2")
    assert gpus.job_pool_size("basic", None) == 2  # concurrent single runs share the machine's GPUs too
    assert gpus.job_pool_size("slurm", None) == 0 and gpus.job_pool_size("submitit_local", None) == 0
    monkeypatch.setenv("HPA_SIMULATE_GPUS", "3")
    assert gpus.job_pool_size("basic", None) == 3


# ------------------------------------------------------------------------------- sweep folders do not collide

FROZEN_SECOND = textwrap.dedent("""
    import datetime as _dt, sys
    import hydra, hydra.core.utils
    from pathlib import Path

    class SameSecond(_dt.datetime):  # every `${now:...}` falls in one second; microseconds stay real
        @classmethod
        def now(cls, tz=None):
            return _dt.datetime.now(tz).replace(year=2030, month=1, day=1, hour=0, minute=0, second=0)

    hydra.core.utils.datetime = SameSecond

    @hydra.main(version_base="1.3", config_path=sys.argv.pop(1), config_name="train")
    def main(cfg):
        Path(cfg.paths.output_dir, "job_done").write_text(cfg.experiment_name)

    main()
""")


def test_two_sweeps_started_in_the_same_second_get_different_folders(tmp_path: Path) -> None:
    script = tmp_path / "fake_train.py"
    script.write_text(FROZEN_SECOND)
    cmd = [sys.executable, str(script), str(REPO / "conf"), "-m", "+sweep=poster", "+experiment=bce,focal_g02"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    sweeps = sorted((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(sweeps) == 2, sweeps  # distinct folders, though both names say 2030-01-01 00:00:00
    assert all(s.name.startswith("2030-01-01_00-00-00-") and s.name.endswith("_sweep-poster") for s in sweeps)
    for sweep in sweeps:
        assert (sweep / "multirun.yaml").is_file()
        jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
        assert jobs == ["0_bce", "1_focal_g02"]
        for job in jobs:
            assert (sweep / job / "job_done").read_text() == job.split("_", 1)[1]
            overrides = OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")
            assert f"+experiment={job.split('_', 1)[1]}" in overrides and "+sweep=poster" in overrides


def test_plain_multirun_uses_the_default_sweep_folder(tmp_path: Path) -> None:
    """conf/hydra/default.yaml's sweep dir lies under paths.log_dir, i.e. `${hydra:runtime.cwd}`: Hydra 1.3 alone
    cannot resolve that in a multirun's controller (ControllerHydraConfig makes it)."""
    script = tmp_path / "fake_train.py"
    script.write_text(FROZEN_SECOND)
    proc = subprocess.run([sys.executable, str(script), str(REPO / "conf"), "-m", "seed=1,2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [sweep] = (tmp_path / "outputs" / "multiruns").iterdir()
    assert sweep.name.endswith("_default") and (sweep / "0" / "job_done").is_file() and (sweep / "1").is_dir()


# ------------------------------------------------------------------------------------- rerun bookkeeping


def test_merge_overrides_replaces_same_keys() -> None:
    original = ["+experiment=bce", "optimizer.lr=1e12", "+preset=tiny"]
    assert merge_overrides(original, ["optimizer.lr=0.01", "trainer.max_epochs=1", "experiment=focal_g02"]) == [
        "+experiment=focal_g02", "optimizer.lr=0.01", "+preset=tiny", "trainer.max_epochs=1"]


def _job(folder: Path, status: str | None, overrides: list[str], **fields) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if status == "completed":
        (folder / "results.json").write_text("{}")
    if status:
        write_status(folder, status, fresh=True, **fields)
    return folder


def test_failed_jobs_follow_rerun_chains(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _job(sweep / "0", "completed", ["a=0"])
    _job(sweep / "1", "failed", ["a=1"], error="NonFiniteLossError: nan")
    _job(sweep / "2", "failed", ["a=2"], error="boom", started="2026-01-01T00:00:00")
    _job(sweep / "2_rerun1", "completed", ["a=2"], rerun_of=str(sweep / "2"), started="2026-01-01T01:00:00")
    _job(sweep / "3", "running", ["a=3"], pid=2**22 + 12345, host="elsewhere")  # maybe alive on another host
    _job(sweep / "4", "running", ["a=4"], pid=999999999, host=socket.gethostname())  # its process is gone
    _job(sweep / "5", None, ["a=5"])  # never marked: killed before it started
    statuses = {job.dir.name: job.status for job in find_jobs(sweep)}
    assert statuses == {"0": "completed", "1": "failed", "2": "failed", "2_rerun1": "completed", "3": "running",
                        "4": "crashed", "5": "incomplete"}
    assert [job.dir.name for job in failed_jobs(sweep)] == ["1", "4", "5"]
    assert (sweep / "1" / "FAILED").read_text().strip() == "NonFiniteLossError: nan"


# ------------------------------------------------------------------------- one real sweep, end to end (slow)


def run_module(args: list[str], cache: Path, cwd: Path, env: dict | None = None, module: str = "hpa_lightning.train",
               timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HPA_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


GPU_ENV = {"HPA_SIMULATE_GPUS": "2"}
LRS = ["0.02", "1e30", "0.05"]  # job 1 diverges: NonFiniteLossError


def lr_override(overrides) -> float:
    [value] = [o.split("=", 1)[1] for o in overrides if o.startswith("optimizer.lr=")]
    return float(value)


@pytest.fixture(scope="module")
def sweep(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("sweeps") / "lr_sweep"
    env = {**GPU_ENV, "HPA_GPU_LOCK_DIR": str(folder.parent / "locks")}
    proc = run_module(["-m", "+preset=tiny", "trainer.max_epochs=1", f"optimizer.lr={','.join(LRS)}",
                       "logger=wandb_csv", "logger.wandb.mode=offline", "logger.wandb.panels.samples=3",
                       "hydra/launcher=gpu_pool", f"hydra.sweep.dir={folder}"], shared_cache, REPO, env=env)
    return folder, proc


@pytest.mark.slow
def test_a_failing_job_is_marked_and_the_others_complete(sweep) -> None:
    folder, proc = sweep
    assert proc.returncode != 0  # Hydra reports the failed job after running all of them
    assert "NonFiniteLossError" in proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr  # 2 (simulated) GPUs -> 2 jobs at once
    for num in (0, 2):
        results = json.loads((folder / str(num) / "results.json").read_text())
        assert results["status"] == "completed" and results["device"] == "cpu"
        assert json.loads((folder / str(num) / "status.json").read_text())["status"] == "completed"
        assert not (folder / str(num) / "FAILED").exists()
    failed = folder / "1"
    assert not (failed / "results.json").exists()
    assert (failed / "FAILED").read_text().startswith("NonFiniteLossError: non-finite training loss")
    status = json.loads((failed / "status.json").read_text())
    assert status["status"] == "failed" and lr_override(status["overrides"]) == 1e30
    assert "NonFiniteLossError" in status["traceback"]
    for num, lr in enumerate(LRS):  # each job's own overrides, for reruns
        assert lr_override(OmegaConf.load(folder / str(num) / ".hydra" / "overrides.yaml")) == float(lr)


@pytest.mark.slow
def test_each_job_claimed_its_own_gpu(sweep) -> None:
    folder, _ = sweep
    claims = [json.loads((folder / str(num) / "status.json").read_text())["gpu"] for num in range(3)]
    assert all(c["simulated"] and c["n_gpus"] == 2 and c["index"] in (0, 1) for c in claims)
    assert not overlapping_pairs_share_a_gpu([(c["index"], c["claimed_at"], c["released_at"]) for c in claims])
    for num in (0, 2):
        results = json.loads((folder / str(num) / "results.json").read_text())
        assert results["gpu"]["index"] == claims[num]["index"]


@pytest.mark.slow
def test_every_job_has_its_own_wandb_run(sweep) -> None:
    from hpa_lightning.reporting.wandb_run import offline_runs, read_offline_run

    folder, _ = sweep
    runs = {num: offline_runs(folder / str(num)) for num in range(3)}
    assert all(len(found) == 1 for found in runs.values()), runs
    assert len({found[0] for found in runs.values()}) == 3
    for num in range(3):
        run = read_offline_run(runs[num][0], wait_s=60)
        assert run["group"] == folder.name and run["name"] == f"default-{num}"
        # the experiment, then the job's swept value as Hydra gave it to the job (1e30 -> 1e+30): the dashboard's
        # axes; its arm is the W&B job type
        [swept] = [o for o in yaml.safe_load((folder / str(num) / ".hydra" / "overrides.yaml").read_text())
                   if o.startswith("optimizer.lr=")]
        assert float(swept.split("=")[1]) == float(LRS[num])
        assert run["tags"] == ["default", swept] and run["job_type"] == swept
        assert run["config"]["optimizer"]["lr"] == float(LRS[num])  # the resolved job config
        if num == 1:
            assert run["exit_code"] == 1 and run["summary"]["error"].startswith("NonFiniteLossError")
            continue
        assert run["exit_code"] == 0
        assert 0 <= run["summary"]["test/macro_f1"] <= 1 and "val/macro_f1" in run["summary"]
        assert any("lr/head" in row for row in run["history"])
        media = " ".join(run["media"])
        assert "results/per_class" in media and "test/pr_curves" in media and "test/roc_curves" in media
        assert sum("test/samples" in m for m in run["media"]) == 3


@pytest.fixture(scope="module")
def rerun(sweep, shared_cache: Path) -> subprocess.CompletedProcess:
    folder, _ = sweep
    env = {**GPU_ENV, "HPA_GPU_LOCK_DIR": str(folder.parent / "locks")}
    return run_module([str(folder), "optimizer.lr=0.01"], shared_cache, REPO, env=env,
                      module="hpa_lightning.rerun_failed")


@pytest.mark.slow
def test_rerun_failed_relaunches_only_the_failed_job(sweep, rerun, shared_cache: Path) -> None:
    folder, _ = sweep
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{folder / '1'} [failed" in rerun.stdout and "1 of 1 reruns completed" in rerun.stdout
    new = folder / "1_rerun1"
    results = json.loads((new / "results.json").read_text())
    assert results["base_lr"] == 0.01 and results["gpu"]["simulated"]
    status = json.loads((new / "status.json").read_text())
    assert status["rerun_of"] == str((folder / "1").resolve()) and status["status"] == "completed"
    assert OmegaConf.load(new / ".hydra" / "overrides.yaml")[:3] == ["+preset=tiny", "trainer.max_epochs=1",
                                                                      "optimizer.lr=0.01"]
    assert (folder / "1" / "FAILED").is_file()  # the failed attempt stays as it was
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["0", "1", "1_rerun1", "2"]
    again = run_module([str(folder)], shared_cache, REPO, module="hpa_lightning.rerun_failed")
    assert again.returncode == 0 and "no failed jobs" in again.stdout


@pytest.mark.slow
def test_report_of_the_sweep(sweep, rerun, tmp_path: Path) -> None:
    from hpa_lightning import report

    folder, _ = sweep
    assert report.main([str(folder), f"out={tmp_path / 'report'}"]) == 0
    frame = pd.read_csv(tmp_path / "report" / "results.csv", dtype={"run": str, "rerun": str})
    assert sorted(frame["run"]) == ["0", "1", "1_rerun1", "2"]
    failed = frame[frame["run"] == "1"].iloc[0]
    assert failed["status"] == "failed" and failed["rerun"] == "1_rerun1"
    assert "NonFiniteLossError" in failed["error"]
    for name in ("test_macro_f1.png", "test_roc_auc.png", "report.md"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
