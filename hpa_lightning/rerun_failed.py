"""Relaunch the failed jobs of a sweep with their original overrides.

    python -m hpa_lightning.rerun_failed SWEEP_DIR                       # rerun every failed job, one at a time
    python -m hpa_lightning.rerun_failed SWEEP_DIR jobs=4                # up to 4 at once (GPU jobs claim a GPU each)
    python -m hpa_lightning.rerun_failed SWEEP_DIR optimizer.lr=0.01     # ... with overrides replacing the originals
    python -m hpa_lightning.rerun_failed SWEEP_DIR dry_run=true          # only print the commands
    python -m hpa_lightning.rerun_failed SWEEP_DIR trust=mylosses.AsymmetricLoss   # jobs that used your own code
    python -m hpa_lightning.rerun_failed SWEEP_DIR include_running=true  # also jobs still marked running (a lost host)

Every job of `hpa_lightning.train` (single run or sweep job) keeps `status.json` in its folder: `running` while it
runs (with pid and host), then `completed` or `failed` (with the error line and traceback); a failed job also gets a
`FAILED` file holding the error line. `results.json` is written only by a successful run. `JobGuard`
(runs/status.py, used by `hpa_lightning.train.main`) writes these markers, claims a GPU (runs/gpus.py) and ends the
job's W&B run through its hooks (reporting/wandb_hooks.py), marking it failed when the job fails.

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

The saved overrides are read back from a folder anyone may have written: a rerun builds only the allowlisted
`_target_`s (hpa_lightning.targets) and those named with `trust=` (or HPA_TRUST_TARGETS).
"""

from __future__ import annotations

import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import UnsafeTargetError, UsageError
from hpa_lightning.runs import layout
from hpa_lightning.runs.find import RERUNNABLE, failed_jobs
from hpa_lightning.runs.rerun import plan_rerun, run_rerun
from hpa_lightning.targets import trust_in_this_process


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv,
                                {"jobs": 1, "dry_run": False, "include_running": False, "trust": ""},
                                "hpa_lightning.rerun_failed", positional="sweep_dir", overrides=True)
    except UsageError as err:
        fail(err)
    trust_in_this_process(str(args["trust"]))  # the reruns inherit it: their saved configuration is checked against it
    sweep_dir = Path(str(args["sweep_dir"]))
    if not sweep_dir.is_dir():
        fail(f"{sweep_dir}: no such folder")
    statuses = RERUNNABLE + (("running",) if args["include_running"] else ())
    jobs = failed_jobs(sweep_dir, statuses)
    if not jobs:
        print(f"no failed jobs under {sweep_dir}")
        return 0
    reruns = []
    for job in jobs:
        try:
            rerun = plan_rerun(job, list(args["overrides"]))
        except UnsafeTargetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        reruns.append(rerun)
        print(f"{job.dir} [{job.status}: {job.error or '-'}]\n  -> {rerun.new_dir}\n  $ (cd {rerun.cwd} && "
              f"{shlex.join(rerun.command)})")
    if args["dry_run"]:
        return 0
    codes = []
    with ThreadPoolExecutor(max_workers=max(1, int(args["jobs"]))) as pool:
        for rerun, code in pool.map(run_rerun, reruns):
            ok = (rerun.new_dir / layout.RESULTS).is_file()
            codes.append(0 if ok else code or 1)
            print(f"{'completed' if ok else 'FAILED'}: {rerun.new_dir}"
                  + ("" if ok else f" (exit status {code}; see {rerun.new_dir / 'rerun_output.log'})"))
    failed = sum(1 for c in codes if c)
    print(f"{len(codes) - failed} of {len(codes)} reruns completed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
