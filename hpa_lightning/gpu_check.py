"""The GPU acceptance check in one call: `python -m hpa_lightning.gpu_check [out=DIR] [report=DIR] [budget_s=S]
[workers=N] [rehearse=true]` (`make gpu-check`; on a lent machine the command `make gpu-bundle` prints).

Benchmark (ResNet50, 512 px, bf16-mixed, channels_last, cudnn.benchmark: eager at batch sizes from 32 up to where
memory or images/s stops growing), one training epoch of focal_g02 at 512 px with `trainer=gpu`, `predict tta=8`,
a two-job `hydra/launcher=gpu_pool` sweep and last `model.compile`, within one budget (default 420 s); writes
`<report>/gpu_check.json` and `summary.txt` after every step (steps: hpa_lightning/bench/acceptance.py). `out` holds
data and runs, `report` (default: out) only the report and the logs. Without a CUDA device it fails with one line
and exit status 1: it never skips. `rehearse=true` runs the same sequence on the CPU at tiny sizes, with the import
tracer that resolves the device bundle (hpa_lightning/bench/device_wheels.py); the test suite runs it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import UsageError
from hpa_lightning.machine import available_cpus

PROG = "hpa_lightning.gpu_check"


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv,
                                {"out": f"outputs/gpu_check/{time.strftime('%Y-%m-%d_%H-%M-%S')}", "report": "",
                                 "workers": 0, "budget_s": 0.0, "rehearse": False}, PROG)
    except UsageError as err:
        fail(err)
    out = Path(str(args["out"])).resolve()
    rehearse = bool(args["rehearse"])
    trace = out / "imports" if rehearse else None
    if trace is not None:  # before Lightning, timm, Hydra: the bundle is read off everything the check imports
        from hpa_lightning.bench.device_wheels import start_tracing

        start_tracing(trace)
    from hpa_lightning.bench.acceptance import GPU, REHEARSAL, NoCudaError, run_check, summary

    settings = REHEARSAL if rehearse else GPU
    if float(args["budget_s"]) > 0:
        settings = replace(settings, budget_s=float(args["budget_s"]))
    workers = int(args["workers"]) or min(16, available_cpus())
    try:
        report = run_check(out, Path(str(args["report"]) or out).resolve(), workers, settings, trace)
    except NoCudaError as err:
        fail(err, status=1)
    print(summary(report), flush=True)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
