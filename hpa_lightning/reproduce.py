"""The poster's comparison regenerated on the embedded synthetic data: `make reproduce`.

    python -m hpa_lightning.reproduce [preset=demo] [arms=bce,focal_g02] [work=outputs/reproduce/<time>]
        [docs=docs/results/synthetic]

Runs the ten arms of `+sweep=poster` at the demo's scale (`+preset=demo`: resnet10t from scratch at 64 px on 3000
synthetic samples, CPU-sized), the logistic-regression and random-forest baselines, the LR finder and the report,
and publishes the report's table (markdown and CSV), figures and plots with the exact commands, versions, machine and
wall times into `docs` (hpa_lightning/reporting/poster.py). `arms=` narrows the sweep (a quick check).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hpa_lightning import SOURCE_ROOT
from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import UsageError
from hpa_lightning.reporting.poster import reproduce, summary

PROG = "hpa_lightning.reproduce"


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv,
                                {"preset": "demo", "arms": "", "work": "", "docs": str(SOURCE_ROOT / "docs" / "results"
                                                                                        / "synthetic")}, PROG)
        work = Path(str(args["work"]) or f"outputs/reproduce/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
        record = reproduce(work, Path(str(args["docs"])), str(args["preset"]), str(args["arms"]) or None)
    except (UsageError, RuntimeError) as err:
        fail(err, status=2 if isinstance(err, UsageError) else 1)
    print(summary(record))


if __name__ == "__main__":
    main()
