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

from hpa_lightning.cli import ENV_SAVED_OVERRIDES, fail, parse_key_values
from hpa_lightning.errors import UsageError
from hpa_lightning.targets import trust_in_this_process
from hpa_lightning.training.continuation import resume_command


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv, {"trust": ""}, "hpa_lightning.resume",
                                positional="run_dir", overrides=True)
        trust_in_this_process(str(args["trust"]))
        run_dir = Path(str(args["run_dir"])).resolve()
        command = resume_command(run_dir, list(args["overrides"]))
    except UsageError as err:
        fail(err)
    print("resuming:", " ".join(command[2:]), flush=True)
    saved = run_dir / ".hydra" / "overrides.yaml"
    child = subprocess.Popen(command, env={**os.environ, ENV_SAVED_OVERRIDES: str(saved)})
    try:
        code = child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too: let it save its checkpoint and exit
        code = child.wait()
    # a child killed by signal N reports -N; the shell's convention is 128 + N
    raise SystemExit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()
