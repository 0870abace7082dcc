"""attempts.json: every attempt of a resumed or requeued run, with its wall time and how it ended."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from hpa_lightning.files import write_json_atomic
from hpa_lightning.runs import layout


class AttemptLog:
    """`attempts.json` in the run folder: one entry per attempt at the run (first start, resumes, requeues), with its
    host, SLURM ids, start, wall time, fit/evaluate times and how it ended, so that a requeued run's results.json can
    report every attempt and their total, not only the last one. A fresh (not resumed) run starts a new list."""

    FILE = layout.ATTEMPTS

    def __init__(self, run_dir: Path, started: float, resumed_from: str | None, active: bool = True):
        import socket

        from hpa_lightning.runs.status import slurm_ids

        self.path = Path(run_dir) / self.FILE
        self.active = active
        self.previous = self._read() if resumed_from else []
        self.current = {"attempt": len(self.previous) + 1, "host": socket.gethostname(), **slurm_ids(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                        "resumed_from": resumed_from}
        self.started = started
        self.finished: list[dict] = []

    def _read(self) -> list[dict]:
        try:
            attempts = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return attempts if isinstance(attempts, list) else []

    @contextlib.contextmanager
    def recording(self, timings: dict[str, float]):
        """Write this attempt's entry when the block ends, however it ends (completed, interrupted, failed)."""
        outcome = "completed"
        try:
            yield self
        except BaseException as err:
            outcome = f"stopped: {type(err).__name__}"
            raise
        finally:
            entry = {**self.current, "outcome": outcome, "wall_s": round(time.time() - self.started, 2),
                     **{name: round(seconds, 2) for name, seconds in timings.items()}}
            self.finished = [*self.previous, entry]
            if self.active:
                write_json_atomic(self.path, self.finished)
