"""The job lifecycle's W&B hooks: one W&B run per job, result panels after success, the run finished either way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpa_lightning.reporting.wandb_panels import log_results
from hpa_lightning.reporting.wandb_run import build_logger, finish_run
from hpa_lightning.runs.status import JobHooks


class WandbHooks(JobHooks):
    """Loggers of `cfg.logger` with their per-job W&B settings; the W&B run's panels and end (see wandb_run.py)."""

    def build_logger(self, node: Any, cfg: Any) -> Any:
        return build_logger(node, cfg)

    def log_results(self, cfg: Any, results: dict, run_dir: Path) -> None:
        log_results(cfg, results, run_dir)

    def finish_run(self, cfg: Any, failed: bool, error: str | None = None) -> None:
        finish_run(cfg, failed, error)
