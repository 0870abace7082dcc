"""Continue an interrupted run in its own folder: `python -m hpa_lightning.resume RUN_DIR [trust=NAMES] [overrides]`.

Re-launches `hpa_lightning.train` with the run's original overrides (from RUN_DIR/.hydra/overrides.yaml),
`hydra.run.dir=RUN_DIR` and `resume=true`, so it continues from RUN_DIR/checkpoints/last.ckpt: epochs, optimizer,
schedule, LR trace, metrics.csv and RNG state carry on where they stopped.

The saved overrides are read back from a folder anyone may have written: the job builds only the allowlisted
`_target_`s (hpa_lightning.targets) and those named by `trust=` (comma-separated; or HPA_TRUST_TARGETS), so a run that
used a loss or callback of your own resumes with `trust=mylosses.AsymmetricLoss`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from hpa_lightning.cli import ENV_SAVED_OVERRIDES, fail
from hpa_lightning.runs.rerun import config_dir_overrides, read_hydra_config
from hpa_lightning.targets import trust_in_this_process

REPLACED = ("hydra.run.dir=", "resume=", "ckpt_path=")


def resume_command(run_dir: Path, extra: list[str]) -> list[str]:
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        fail(f"{overrides_file}: not found; is {run_dir} a run folder of hpa_lightning.train?")
    overrides = [o for o in yaml.safe_load(overrides_file.read_text()) or [] if not o.startswith(REPLACED)]
    # the config dirs of the user's own options (hydra.searchpath, --config-dir) are in hydra.yaml, not overrides.yaml
    searchpath = [] if any(e.startswith("hydra.searchpath=") for e in extra) else config_dir_overrides(
        read_hydra_config(run_dir))
    return [sys.executable, "-m", "hpa_lightning.train", *overrides, *searchpath, *extra, f"hydra.run.dir={run_dir}",
            "resume=true"]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    if not args or args[0].startswith("-"):
        fail("usage: python -m hpa_lightning.resume RUN_DIR [trust=NAMES] [overrides...]")
    trust = [a for a in args[1:] if a.startswith("trust=")]
    for given in trust:
        trust_in_this_process(given.removeprefix("trust="))
    command = resume_command(Path(args[0]).resolve(), [a for a in args[1:] if a not in trust])
    print("resuming:", " ".join(command[2:]), flush=True)
    overrides_file = Path(args[0]).resolve() / ".hydra" / "overrides.yaml"
    child = subprocess.Popen(command, env={**os.environ, ENV_SAVED_OVERRIDES: str(overrides_file)})
    try:
        code = child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too: let it save its checkpoint and exit
        code = child.wait()
    # a child killed by signal N reports -N; the shell's convention is 128 + N
    raise SystemExit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()
