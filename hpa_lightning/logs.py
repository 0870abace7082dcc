"""A quiet, honest run log: known-benign messages silenced by their exact text, everything else kept, and the run's
whole log (Lightning's messages and Python warnings included) in the run folder's `<job>.log` as well as on screen."""

from __future__ import annotations

import logging
import warnings

# Each pattern is the start of one message known to be benign here, with the reason.
BENIGN_WARNINGS = (
    # jobs are started by the user or by our launchers; the README shows srun where it is wanted
    r"The `srun` command is available on your system but is not used",
    # the CSV logger writes into the run folder, which holds .hydra/ (and, on resume, the earlier metrics.csv that
    # training.continuation.continue_csv_logs keeps) by design
    r"Experiment logs directory .* exists and is not empty",
    # Lightning 2.6's use of a torch pytree name that torch deprecated; nothing a user can act on
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # by design: the module's device transform runs in on_after_batch_transfer whatever the DataModule
    r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
)
BENIGN_LOG_MESSAGES = (
    "💡 Tip: For seamless cloud logging",  # Lightning's advertisement for its hosted logger
)


class _DropBenign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BENIGN_LOG_MESSAGES)


def adopt_lightning_loggers() -> None:
    """Lightning gives its loggers a stderr handler of their own when it is imported (and stops their propagation when
    logging is not configured yet): hand them back to the root logger and its run-log file, so that each message shows
    once on screen and lands in the run log. Call after Lightning is imported; setup_run_logging calls it too."""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True


def setup_run_logging() -> None:
    """Call inside a Hydra task (after Hydra configured logging)."""
    for pattern in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.captureWarnings(True)  # warnings go to the log file too, and stay on screen
    adopt_lightning_loggers()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropBenign) for f in logger.filters):
            logger.addFilter(_DropBenign())


def summary(text: str) -> None:
    """The run's closing summary: printed plainly, and written to the run-log file."""
    print(text, flush=True)
    record = logging.LogRecord("hpa_lightning.summary", logging.INFO, __file__, 0, text.strip(), None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


__all__ = ["BENIGN_LOG_MESSAGES", "BENIGN_WARNINGS", "adopt_lightning_loggers", "setup_run_logging", "summary"]
