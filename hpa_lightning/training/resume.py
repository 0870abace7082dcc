"""Continuing a run: exit statuses of an interrupted run and a metrics.csv that a resumed run appends to."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from hpa_lightning.cli import EXIT_TERMINATED
from hpa_lightning.runs import layout
from hpa_lightning.training.callbacks import InterruptCheckpoint


@contextlib.contextmanager
def interrupt_exit_codes(interrupt: InterruptCheckpoint | None):
    """Exit 130 on Ctrl-C and 143 on SIGTERM (Lightning exits 1 on Ctrl-C, and its SIGTERM exception would exit 0)."""
    try:
        yield
    except SIGTERMException:
        raise SystemExit(EXIT_TERMINATED) from None
    except SystemExit:
        if interrupt is not None and interrupt.interrupt_exit_code is not None:
            raise SystemExit(interrupt.interrupt_exit_code) from None
        raise


def continue_csv_logs(loggers: list, resumed_step: int) -> None:
    """A resumed run appends to its metrics.csv (Lightning's CSV writer deletes an existing file when it starts).

    Rows logged after the checkpoint (step >= its global step: a job stopped mid-epoch, or requeued after its last
    epoch-end checkpoint) are logged again by the resumed run, so they are dropped here: no step appears twice.
    """
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            existing = Path(logger.log_dir) / layout.METRICS
            if existing.is_file():
                saved = existing.read_text()
                rows = list(csv.reader(saved.splitlines()))
                header = rows[0] if rows else []
                step = header.index("step") if "step" in header else None
                kept = [row for row in rows[1:] if step is None or not row[step] or int(row[step]) < resumed_step]
                writer = logger.experiment  # this removes the file
                with existing.open("w", newline="") as handle:
                    csv.writer(handle, lineterminator="\n").writerows([header, *kept] if header else [])
                writer.metrics_keys = header
