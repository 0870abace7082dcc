"""Planning and running the reruns of failed jobs (usage and rules: hpa_lightning/rerun_failed.py): a new folder
`<job>_rerunK` beside the original, the original overrides merged with the user's, the sweep's launcher, and
`ckpt_path=` of the job's last.ckpt when it left one."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hpa_lightning.cli import ENV_SAVED_OVERRIDES
from hpa_lightning.errors import UnsafeTargetError
from hpa_lightning.runs import layout
from hpa_lightning.runs.find import Job
from hpa_lightning.runs.status import ENV_RERUN_OF

RERUN_SUFFIX = re.compile(r"^(?P<base>.+)_rerun(?P<k>\d+)$")


RERUNNABLE_ENTRY_POINTS = ("train", "baseline", "lr_find")


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


def config_dir_overrides(hydra_cfg) -> list[str]:
    """`hydra.searchpath=[...]` for the config dirs a job composed from beyond conf/ (`--config-dir`,
    `hydra.searchpath`), as its saved hydra.yaml lists them: a relaunched job finds the user's own options again."""
    from omegaconf import OmegaConf

    sources = OmegaConf.select(hydra_cfg, "runtime.config_sources") or []
    extra = [f"{source.schema}://{source.path}" for source in sources
             if source.get("provider") not in ("hydra", "main", "schema") and source.get("path")]
    return [f"hydra.searchpath=[{','.join(_quote_value(path) for path in extra)}]"] if extra else []


def read_hydra_config(run_dir: Path):
    """The `hydra` node a job saved in .hydra/hydra.yaml; empty when there is none."""
    from omegaconf import OmegaConf

    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    return OmegaConf.load(hydra_yaml).hydra if hydra_yaml.is_file() else OmegaConf.create()


def plan_rerun(job: Job, extra: list[str]) -> Rerun:
    from omegaconf import OmegaConf

    hydra_yaml = job.dir / ".hydra" / "hydra.yaml"
    hydra_cfg = read_hydra_config(job.dir)
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
    placement += config_dir_overrides(hydra_cfg)
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
