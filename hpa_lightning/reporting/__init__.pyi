from .comparison import write_report
from .wandb_hooks import WandbHooks
from .wandb_panels import log_results
from .wandb_run import build_logger, finish_run

__all__ = ["WandbHooks", "build_logger", "finish_run", "log_results", "write_report"]
