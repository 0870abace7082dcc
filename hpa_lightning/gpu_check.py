"""The GPU acceptance check in one call: `make gpu-check` (`python -m hpa_lightning.gpu_check [out=DIR] [workers=N]`).

Benchmark (ResNet50, 512 px, bf16-mixed, channels_last, eager at batch sizes up to what fits and compiled), one
training epoch of focal_g02 at 512 px with `trainer=gpu`, a two-job `hydra/launcher=gpu_pool` sweep and `predict
tta=8`, in about 8 minutes; writes `<out>/gpu_check.json` and prints a summary with the GPU's name (steps:
hpa_lightning/bench/gpu_check.py). Without a CUDA device it fails with one line and exit status 1: it never skips.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hpa_lightning.bench.gpu_check import NoCudaError, gpu_check, summary
from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import UsageError
from hpa_lightning.resources import available_cpus

PROG = "hpa_lightning.gpu_check"


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv,
                                {"out": f"outputs/gpu_check/{time.strftime('%Y-%m-%d_%H-%M-%S')}", "workers": 0},
                                PROG)
        report = gpu_check(Path(str(args["out"])), int(args["workers"]) or min(16, available_cpus()))
    except UsageError as err:
        fail(err)
    except NoCudaError as err:
        fail(err, status=1)
    print(summary(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
