"""On a real one-node SLURM cluster (tests/slurm/cluster.sh, started by `make test-slurm`), through the project's own
launcher config: a sweep that packs inside its jobs, a job requeued mid-epoch, DDP under srun, a job that pends.

Skipped, with the reason, where no cluster answers (`make test` never starts one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, assert_no_duplicate_steps

pytestmark = pytest.mark.slurm
TINY = ["+experiment=focal_g02", "+preset=tiny", "data.image_size=24", "hydra/launcher=slurm"]


def cluster_answers() -> str | None:
    if not shutil.which("sinfo"):
        return "SLURM is not installed (bash tests/slurm/cluster.sh up installs it, as root on Debian)"
    proc = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return f"no SLURM cluster answers ({proc.stderr.strip() or 'no debug partition'}); start one with " \
               "bash tests/slurm/cluster.sh up"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    reason = cluster_answers()
    if reason:
        pytest.skip(reason)


def env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "HPA_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **extra}


def sweep(args: list[str], cache: Path, timeout: int = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpa_lightning.train", "-m", *args], cwd=REPO, env=env(cache, **extra),
                          capture_output=True, text=True, timeout=timeout)


def test_sweep_packs_inside_its_jobs_and_reports(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # a fresh cache: the first job generates and packs inside SLURM, where submitit bypasses SIGTERM; two pack
    # workers make it use the process pool that used to deadlock there
    proc = sweep([*TINY, "loss.gamma=0.2,1.0", "trainer.max_epochs=1", "data.synthetic.n=120", "data.pack_workers=2",
                  f"hydra.sweep.dir={sweep_dir}"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        status = json.loads((sweep_dir / job / "status.json").read_text())
        assert status["status"] == "completed" and status["slurm_array_task_id"] == job
        assert status["slurm_array_job_id"] and status["slurm_job_id"]
        assert json.loads((sweep_dir / job / "results.json").read_text())["gamma"] == [0.2, 1.0][int(job)]
    script = next((sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --cpus-per-task=1" in script  # derived: no reader threads
    report = subprocess.run([sys.executable, "-m", "hpa_lightning.report", str(sweep_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert (sweep_dir / "report" / "report.md").is_file()


def squeue_ids(sweep_dir: Path) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%o"], capture_output=True, text=True, check=True).stdout
    return [line.split("|")[0] for line in out.splitlines() if str(sweep_dir) in line]


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_job_requeued_mid_epoch_resumes_to_the_configured_epochs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    controller = subprocess.Popen(
        [sys.executable, "-m", "hpa_lightning.train", "-m", *TINY, "trainer.max_epochs=4", "data.synthetic.n=400",
         "resume=auto", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_dir = sweep_dir / "0"
        wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").is_file(), 300, "the first epoch's checkpoint")
        time.sleep(1.0)  # into the second epoch
        [job_id] = squeue_ids(sweep_dir)
        subprocess.run(["scontrol", "requeue", job_id], check=True)  # SIGTERM now, the same job again later
        wait_for(lambda: "PENDING" in subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                                                     text=True).stdout, 120, "the requeued job to pend")
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)  # skip BeginTime
        stdout, stderr = controller.communicate(timeout=600)
    finally:
        if controller.poll() is None:
            controller.kill()
    assert controller.returncode == 0, stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 4
    first, second = results["attempts"]
    assert first["outcome"].startswith("stopped") and second["resumed_from"].endswith("last.ckpt")
    assert first["slurm_job_id"] == second["slurm_job_id"]
    assert_no_duplicate_steps(run_dir)


def test_ddp_under_srun_shares_one_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "hpa_lightning.train", "+experiment=focal_g02", "+preset=tiny", "trainer=ddp_cpu",
               "trainer.max_epochs=2", "data.synthetic.n=150", "data.image_size=24", "data.eval_batch_size=7",
               f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=8G",
                           f"--output={tmp_path / 'slurm-%j.out'}", f"--chdir={REPO}",
                           "--wrap", "srun " + " ".join(command)],
                          env=env(tmp_path / "cache"), capture_output=True, text=True, timeout=900)
    log = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, log[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["cache", "ddp"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 2
    assert log.count("run folder:") == 1  # rank 0 alone writes and reports
    predictions = pd.read_csv(run_dir / "test_predictions.csv")
    assert predictions["Id"].is_unique and len(predictions) == results["test"]["n_samples"]


def test_a_job_that_cannot_start_is_reported(tmp_path: Path) -> None:
    sweep_dir, log = tmp_path / "sweep", tmp_path / "controller.err"
    with log.open("w") as stderr:
        controller = subprocess.Popen(
            [sys.executable, "-m", "hpa_lightning.train", "-m", *TINY, "hydra.launcher.partition=closed",
             f"hydra.sweep.dir={sweep_dir}"],
            cwd=REPO, env=env(tmp_path / "cache", HPA_SLURM_POLL_S="2"), stdout=subprocess.DEVNULL, stderr=stderr)
    job_ids: list[str] = []
    try:
        job_ids = wait_for(lambda: squeue_ids(sweep_dir), 60, "the job to be queued")
        wait_for(lambda: "is pending" in log.read_text(), 60, "the pending report")
        time.sleep(6)  # more polls: still reported once
    finally:
        for job_id in job_ids:
            subprocess.run(["scancel", job_id])
        controller.kill()  # submitit cannot tell a cancelled job without accounting: it would wait for ever
        controller.wait()
    text = log.read_text()
    assert f"SLURM job {job_ids[0]} is pending: PartitionDown" in text, text[-3000:]
    assert text.count("is pending: PartitionDown") == 1  # once per job and reason


def test_rerun_of_a_failed_job_goes_through_the_launcher_and_resumes(tmp_path: Path) -> None:
    sweep_dir, cache = tmp_path / "sweep", tmp_path / "cache"
    proc = sweep([*TINY, "trainer.max_epochs=1", "data.synthetic.n=120", f"hydra.sweep.dir={sweep_dir}"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = sweep_dir / "0"
    # as if the job had died after its first epoch: a checkpoint, no results, marked failed
    (job / "results.json").unlink()
    (job / "status.json").write_text(json.dumps({"status": "failed", "error": "node failure"}))
    proc = subprocess.run([sys.executable, "-m", "hpa_lightning.rerun_failed", str(sweep_dir), "trainer.max_epochs=2"],
                          cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rerun = sweep_dir / "0_rerun1"
    status = json.loads((rerun / "status.json").read_text())
    assert status["slurm_job_id"] and status["rerun_of"] == str(job.resolve())  # ran as a SLURM job
    results = json.loads((rerun / "results.json").read_text())
    assert results["epochs"] == 2
    assert results["attempts"][0]["resumed_from"] == str((job / "checkpoints" / "last.ckpt").resolve())
