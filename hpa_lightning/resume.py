"""Continue an interrupted run in its own folder: `python -m hpa_lightning.resume RUN_DIR [extra overrides]`.

Re-launches `hpa_lightning.train` with the run's original overrides (from RUN_DIR/.hydra/overrides.yaml),
`hydra.run.dir=RUN_DIR` and `resume=true`, so it continues from RUN_DIR/checkpoints/last.ckpt: epochs, optimizer,
schedule, LR trace, metrics.csv and RNG state carry on where they stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from hpa_lightning.cli import ENV_SAVED_OVERRIDES, fail

REPLACED = ("hydra.run.dir=", "resume=", "ckpt_path=")


def resume_command(run_dir: Path, extra: list[str]) -> list[str]:
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        fail(f"{overrides_file}: not found; is {run_dir} a run folder of hpa_lightning.train?")
    overrides = [o for o in yaml.safe_load(overrides_file.read_text()) or [] if not o.startswith(REPLACED)]
    return [sys.executable, "-m", "hpa_lightning.train", *overrides, *extra, f"hydra.run.dir={run_dir}", "resume=true"]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0].startswith("-"):
        fail("usage: python -m hpa_lightning.resume RUN_DIR [overrides...]")
    command = resume_command(Path(args[0]).resolve(), args[1:])
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
