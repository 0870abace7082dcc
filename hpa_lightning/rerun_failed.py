"""Job status markers of sweeps, and relaunching the failed jobs of a sweep with their original overrides.

    python -m hpa_lightning.rerun_failed SWEEP_DIR                       # rerun every failed job, one at a time
    python -m hpa_lightning.rerun_failed SWEEP_DIR --jobs 4              # up to 4 at once (GPU jobs claim a GPU each)
    python -m hpa_lightning.rerun_failed SWEEP_DIR optimizer.lr=0.01     # ... with overrides replacing the originals
    python -m hpa_lightning.rerun_failed SWEEP_DIR --dry-run             # only print the commands

Every job of `hpa_lightning.train` (single run or sweep job) keeps `status.json` in its folder: `running` while it
runs (with pid and host), then `completed` or `failed` (with the error line and traceback); a failed job also gets a
`FAILED` file holding the error line. `results.json` is written only by a successful run. `JobGuard` (used by
`hpa_lightning.train.main`) writes these markers, claims a GPU (`hpa_lightning.gpus`) and closes the job's W&B run
(`hpa_lightning.wandb_logging`), marking it failed when the job fails.

Reruns go into NEW job folders next to the original, `<job>_rerun1`, `<job>_rerun2`, ..., so the failed folder and
its error stay as they were; each rerun's status.json names the folder it reruns (`rerun_of`), and
`hpa_lightning.report` shows the failed job with its successful rerun. A job counts as failed when neither it nor any
of its reruns has results.json and its status is `failed`, `crashed` (status `running` but its process, on this
host, is gone) or unknown (a job folder without any marker). Jobs still `running` are left alone.

A rerun is a single run (`python -m hpa_lightning.<job name> <original overrides> hydra.run.dir=<new folder>`,
from the sweep's original working directory), so sweeper settings do not apply: a rerun Optuna trial is not told
to the study. A job that ran under the `gpu_pool` launcher claims a GPU of the same pool size; a job of a SLURM
sweep (`hydra/launcher=slurm`) is resubmitted through that launcher with the sweep's launcher overrides, as a
one-job multirun whose folder is the new one. A training job that left `checkpoints/last.ckpt` continues from it
(`ckpt_path=`: weights, optimizer, schedule and epoch) instead of starting over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback

from hpa_lightning import layout
from hpa_lightning.cli import ENV_SAVED_OVERRIDES
from hpa_lightning.files import pid_alive
from hpa_lightning.targets import UnsafeTargetError

STATUS_FILE, FAILED_FILE, RESULTS_FILE = layout.STATUS, layout.FAILED, layout.RESULTS
ENV_RERUN_OF = "HPA_RERUN_OF"
RERUN_SUFFIX = re.compile(r"^(?P<base>.+)_rerun(?P<k>\d+)$")
SKIP_DIRS = {"wandb", "checkpoints", ".hydra", ".submitit", "lightning_logs"}


# ------------------------------------------------------------------------------------------------ status markers


def error_line(err: BaseException) -> str:
    if isinstance(err, SystemExit):
        return f"SystemExit: exit status {err.code}"
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    return line[:1000]


def read_status(job_dir: Path) -> dict:
    path = Path(job_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_status(job_dir: Path, status: str, fresh: bool = False, **fields) -> dict:
    """Update status.json (a `fresh` one starts empty: a new attempt in this folder) and the FAILED marker."""
    from hpa_lightning.files import write_json_atomic

    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    payload = {**({} if fresh else read_status(job_dir)), "status": status, **fields}
    if status == "running":
        payload.pop("finished", None)
        (job_dir / FAILED_FILE).unlink(missing_ok=True)
    else:
        payload["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(job_dir / STATUS_FILE, payload)
    if status == "failed":
        (job_dir / FAILED_FILE).write_text(payload.get("error", "failed") + "\n")
    return payload


def _hydra_job_info() -> dict:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return slurm_ids()
    hydra_cfg = HydraConfig.get()
    info = {"mode": str(hydra_cfg.mode.name) if hydra_cfg.mode is not None else None,
            "overrides": list(hydra_cfg.overrides.task), "job_name": hydra_cfg.job.name}
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        info["job_num"] = int(hydra_cfg.job.num)
        info["sweep_dir"] = str(Path(hydra_cfg.sweep.dir).resolve())
    return {**info, **slurm_ids()}


# SLURM's names for a job: its id, and for an array task (a sweep job under hydra/launcher=slurm) the array's id and
# the task's index; a requeued job keeps them, and `sacct -j` / `scontrol show job` take them.
SLURM_ID_VARIABLES = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
                      "slurm_array_task_id": "SLURM_ARRAY_TASK_ID", "slurm_restart_count": "SLURM_RESTART_COUNT"}


def slurm_ids() -> dict[str, str]:
    return {key: os.environ[name] for key, name in SLURM_ID_VARIABLES.items() if os.environ.get(name)}


def process_rank() -> int:
    """The global rank of this process as the launchers set it (0 outside distributed training)."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


class JobGuard:
    """The bookkeeping around one training job: status markers, GPU claim, W&B run.

        with JobGuard(cfg) as job:
            results = job.finish(train(cfg))

    Inside the block the job holds its GPU (if the launcher or `HPA_NUM_GPUS` asks for claims). On leaving, the
    job is marked `completed`, or `failed` when an exception (SystemExit included) leaves the block: then its W&B
    run (created on the spot if training never started one) is finished with exit code 1 and the exception goes on
    (Hydra's multirun marks the job failed and runs the others).
    """

    def __init__(self, cfg, run_dir: str | Path | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir if run_dir is not None else cfg.paths.output_dir)
        self.claim = None
        self.error: BaseException | None = None
        self._stack = contextlib.ExitStack()
        # DDP ranks 1..N-1 (Lightning re-launches this entry point for them) leave the bookkeeping to rank 0.
        self.active = process_rank() == 0

    def __enter__(self) -> JobGuard:
        from hpa_lightning import gpus

        if not self.active:
            return self
        info = _hydra_job_info()
        write_status(self.run_dir, "running", fresh=True, pid=os.getpid(), host=socket.gethostname(),
                     started=time.strftime("%Y-%m-%dT%H:%M:%S"), rerun_of=os.environ.get(ENV_RERUN_OF), **info)
        try:
            self.claim = self._stack.enter_context(gpus.claim_for_job(job=str(self.run_dir),
                                                                      devices=self.cfg.trainer.get("devices", 1)))
        except BaseException as err:
            self._stack.close()
            self._close(err, sys.exc_info()[2])
            raise
        if self.claim is not None:
            write_status(self.run_dir, "running", gpu=self.claim.as_dict())
        return self

    def fail(self, err: BaseException) -> None:
        """Record `err` as the job's error (before a `sys.exit` that would otherwise be recorded instead)."""
        self.error = err

    def finish(self, results: dict | None) -> dict | None:
        """After a successful `train`: the claimed GPU into results.json, the result panels into the W&B run."""
        from hpa_lightning import wandb_logging

        if not self.active:
            return results
        if results and self.claim is not None and (self.run_dir / RESULTS_FILE).is_file():
            from hpa_lightning.files import write_json_atomic

            results = {**results, "gpu": self.claim.as_dict()}
            write_json_atomic(self.run_dir / RESULTS_FILE, results)
        if results:
            wandb_logging.log_results(self.cfg, results, self.run_dir)
        return results

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.active:
            released_at = time.time()  # just before the GPU lock goes
            self._stack.close()
            extra = {"gpu": {**self.claim.as_dict(), "released_at": released_at}} if self.claim is not None else {}
            self._close(exc, tb, **extra)
        return False

    def _close(self, exc: BaseException | None, tb, **extra) -> None:
        from hpa_lightning import wandb_logging

        if exc is None:
            write_status(self.run_dir, "completed", **extra)
            wandb_logging.finish_run(self.cfg, failed=False)
            return
        error = self.error or exc
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__ or tb))
        write_status(self.run_dir, "failed", error=error_line(error), traceback=trace[-6000:], **extra)
        wandb_logging.finish_run(self.cfg, failed=True, error=error_line(error))


class ControllerHydraConfig(Callback):
    """Hydra callback (conf/hydra/default.yaml): `${hydra:...}` resolvable while a multirun starts.

    Hydra 1.3 installs HydraConfig only inside jobs, so in a multirun's controller `hydra.sweep.dir:
    ${paths.log_dir}/...` (paths.root_dir is `${hydra:runtime.cwd}`) failed with "HydraConfig was not set" (Hydra
    issues 2247 and 3427, fixed after 1.3). The composed config already holds `hydra.runtime.cwd`; installing it
    before the sweeper starts is what the upstream fix does.
    """

    def on_multirun_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)


# ----------------------------------------------------------------------------------------------- finding jobs



@dataclass
class Job:
    dir: Path
    status: str                     # completed | failed | crashed | running | incomplete | lr_find
    error: str | None = None
    overrides: list[str] = field(default_factory=list)
    rerun_of: Path | None = None
    marker: dict = field(default_factory=dict)

    @property
    def origin(self) -> Path:
        """The folder of the first attempt (itself unless this is a rerun)."""
        return self.rerun_of if self.rerun_of is not None else self.dir


def job_status(job_dir: Path) -> tuple[str, dict]:
    job_dir = Path(job_dir)
    marker = read_status(job_dir)
    if (job_dir / RESULTS_FILE).is_file():
        return "completed", marker
    if (job_dir / layout.LR_FIND).is_file():
        return "lr_find", marker
    status = marker.get("status")
    if status == "failed" or (job_dir / FAILED_FILE).is_file():
        return "failed", marker
    if status == "running":
        pid, host = marker.get("pid"), marker.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
            return "crashed", marker
        return "running", marker
    return "incomplete", marker


def _read_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(v) for v in OmegaConf.load(path)]


def find_jobs(root: str | Path) -> list[Job]:
    """Every job folder under `root`: folders with `.hydra/`, results.json or status.json (not inside a job's
    wandb/ or checkpoints/ folders), in natural order of their paths."""
    root = Path(root)
    found: dict[Path, Job] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        is_job = ".hydra" in dirnames or RESULTS_FILE in filenames or STATUS_FILE in filenames
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("offline-run-")]
        if not is_job:
            continue
        status, marker = job_status(here)
        error = marker.get("error") if status in ("failed", "crashed") else None
        if status == "failed" and not error and (here / FAILED_FILE).is_file():
            error = (here / FAILED_FILE).read_text().strip() or None
        if status == "crashed":
            error = f"process {marker.get('pid')} on {marker.get('host')} ended without marking the job"
        rerun_of = marker.get("rerun_of")
        found[here] = Job(dir=here, status=status, error=error, overrides=_read_overrides(here),
                          rerun_of=Path(rerun_of) if rerun_of else None, marker=marker)
    return sorted(found.values(), key=lambda job: natural_key(str(job.dir)))


def natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


RERUNNABLE = ("failed", "crashed", "incomplete")
RERUNNABLE_ENTRY_POINTS = ("train", "baseline", "lr_find")


def failed_jobs(root: str | Path, statuses: tuple[str, ...] = RERUNNABLE) -> list[Job]:
    """The first attempt of every job whose attempts all failed (latest attempt's status in `statuses`)."""
    jobs = find_jobs(root)
    chains: dict[Path, list[Job]] = {}
    for job in jobs:
        chains.setdefault(job.origin.resolve(), []).append(job)
    failed = []
    for origin, attempts in chains.items():
        if any(a.status == "completed" for a in attempts):
            continue
        first = next((a for a in attempts if a.dir.resolve() == origin), attempts[0])
        latest = max(attempts, key=lambda a: a.marker.get("started", ""))
        if first.status == "lr_find" or latest.status not in statuses:
            continue
        failed.append(first)
    return failed


# ------------------------------------------------------------------------------------------------------ rerun


def _override_key(override: str) -> tuple[str, str]:
    """('+', 'experiment') for '+experiment=bce'; ('~', 'key') for '~key'."""
    head = override.split("=", 1)[0]
    prefix = re.match(r"^(\+\+|\+|~)?", head).group(0)
    return prefix, head[len(prefix):]


def merge_overrides(original: list[str], extra: list[str]) -> list[str]:
    """`original` with the overrides of the same keys replaced by those of `extra` (a replacement without a `+`
    prefix keeps the original's prefix), then the other `extra` overrides."""
    merged = list(original)
    for override in extra:
        prefix, key = _override_key(override)
        for i, old in enumerate(merged):
            old_prefix, old_key = _override_key(old)
            if old_key == key:
                merged[i] = override if prefix or "=" not in override else old_prefix + override
                break
        else:
            merged.append(override)
    return merged


def _quote_value(value: str) -> str:
    if re.fullmatch(r"[\w/.\-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def next_rerun_dir(origin: Path) -> Path:
    k = 1
    while (origin.parent / f"{origin.name}_rerun{k}").exists():
        k += 1
    return origin.parent / f"{origin.name}_rerun{k}"


@dataclass
class Rerun:
    job: Job
    new_dir: Path
    command: list[str]
    cwd: Path
    env: dict[str, str]


def plan_rerun(job: Job, extra: list[str]) -> Rerun:
    from omegaconf import OmegaConf

    hydra_yaml = job.dir / ".hydra" / "hydra.yaml"
    hydra_cfg = OmegaConf.load(hydra_yaml).hydra if hydra_yaml.is_file() else OmegaConf.create()
    job_name = OmegaConf.select(hydra_cfg, "job.name") or "train"
    if job_name not in RERUNNABLE_ENTRY_POINTS:  # the file picks the module that runs: only ours
        raise UnsafeTargetError(f"{hydra_yaml}: hydra.job.name {job_name!r} is not one of "
                                f"{', '.join(RERUNNABLE_ENTRY_POINTS)}; refusing to rerun it")
    cwd = Path(OmegaConf.select(hydra_cfg, "runtime.cwd") or Path.cwd())
    if not cwd.is_dir():
        cwd = Path.cwd()
    choices = OmegaConf.select(hydra_cfg, "runtime.choices") or {}
    launcher = choices.get("hydra/launcher")
    launcher_overrides = [str(o) for o in (OmegaConf.select(hydra_cfg, "overrides.hydra") or [])
                          if str(o).startswith("hydra.launcher.")]
    new_dir = next_rerun_dir(job.dir)
    target = _quote_value(str(new_dir.resolve()))
    if launcher == "slurm":
        # through the sweep's own launcher, as a one-job multirun whose job folder is the new folder: it runs on the
        # cluster with the sweep's resources, not on the machine rerun_failed is called from (a login node)
        mode = ["-m"]
        placement = ["hydra/launcher=slurm", *launcher_overrides, f"hydra.sweep.dir={target}", "hydra.sweep.subdir=."]
    elif launcher == "gpu_pool":  # the rerun claims a GPU from the same pool
        mode = []
        pool_size = [o for o in launcher_overrides if o.startswith("hydra.launcher.n_jobs=")]
        placement = ["hydra/launcher=gpu_pool", *pool_size, f"hydra.run.dir={target}"]
    else:
        mode, placement = [], [f"hydra.run.dir={target}"]
    last = layout.checkpoint(job.dir)
    resume = ([f"ckpt_path={_quote_value(str(last.resolve()))}"]
              if job_name == "train" and last.is_file() and not any(o.startswith("ckpt_path=") for o in extra) else [])
    overrides = merge_overrides(job.overrides, [*extra, *resume])
    command = [sys.executable, "-m", f"hpa_lightning.{job_name}", *mode, *overrides, *placement]
    # PYTHONSAFEPATH: the saved cwd must not put a folder of its own in front of the installed package (python -m
    # would import hpa_lightning from the cwd first); Lightning's DDP children inherit it
    env = {**os.environ, ENV_RERUN_OF: str(job.dir.resolve()), "PYTHONSAFEPATH": "1",
           ENV_SAVED_OVERRIDES: str((job.dir / ".hydra" / "overrides.yaml").resolve())}
    return Rerun(job=job, new_dir=new_dir, command=command, cwd=cwd, env=env)


def run_rerun(rerun: Rerun) -> tuple[Rerun, int]:
    rerun.new_dir.mkdir(parents=True, exist_ok=True)
    with (rerun.new_dir / "rerun_output.log").open("w") as out:
        out.write(f"# rerun of {rerun.job.dir}\n# cwd: {rerun.cwd}\n# {shlex.join(rerun.command)}\n")
        out.flush()
        code = subprocess.call(rerun.command, cwd=rerun.cwd, env=rerun.env, stdout=out, stderr=subprocess.STDOUT)
    return rerun, code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpa_lightning.rerun_failed",
                                     description="Relaunch the failed jobs of a sweep with their original overrides, "
                                                 "into new folders <job>_rerunK next to them.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides replacing or adding to the original ones")
    parser.add_argument("--jobs", type=int, default=1, help="reruns at once (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--include-running", action="store_true",
                        help="also rerun jobs still marked running (e.g. killed on another host)")
    args = parser.parse_intermixed_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir}: no such folder", file=sys.stderr)
        return 2
    statuses = RERUNNABLE + (("running",) if args.include_running else ())
    jobs = failed_jobs(args.sweep_dir, statuses)
    if not jobs:
        print(f"no failed jobs under {args.sweep_dir}")
        return 0
    reruns = []
    for job in jobs:
        try:
            rerun = plan_rerun(job, list(args.overrides))
        except UnsafeTargetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        reruns.append(rerun)
        print(f"{job.dir} [{job.status}: {job.error or '-'}]\n  -> {rerun.new_dir}\n  $ (cd {rerun.cwd} && "
              f"{shlex.join(rerun.command)})")
    if args.dry_run:
        return 0
    codes = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for rerun, code in pool.map(run_rerun, reruns):
            ok = (rerun.new_dir / RESULTS_FILE).is_file()
            codes.append(0 if ok else code or 1)
            print(f"{'completed' if ok else 'FAILED'}: {rerun.new_dir}"
                  + ("" if ok else f" (exit status {code}; see {rerun.new_dir / 'rerun_output.log'})"))
    failed = sum(1 for c in codes if c)
    print(f"{len(codes) - failed} of {len(codes)} reruns completed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
