"""Train, validate and test one configuration; write the run folder. `python -m hpa_lightning.train +experiment=...`.

Returns `val/macro_f1` of the best checkpoint, the metric Hydra sweepers optimise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from hpa_lightning.cli import hydra_task, run_hydra
from hpa_lightning.errors import (
    RunSetupError,
    UserError,
)
from hpa_lightning.logs import adopt_lightning_loggers
from hpa_lightning.runs import layout
from hpa_lightning.runs.status import JobGuard
from hpa_lightning.training.continuation import RunComplete, resume_checkpoint


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@hydra_task
def main(cfg: DictConfig) -> float | None:
    # JobGuard: status.json (+ FAILED on failure) in the run folder, a GPU claim under the gpu_pool launcher, the
    # claimed GPU in results.json, result panels and the end of this job's W&B run (failed runs marked failed).
    try:  # before JobGuard: a finished run keeps its status
        resume_checkpoint(Path(cfg.paths.output_dir), cfg.get("resume", False), cfg.get("ckpt_path"))
    except RunComplete as done:
        print(done)
        results = json.loads((Path(cfg.paths.output_dir) / layout.RESULTS).read_text())
        return results.get("val", {}).get("macro_f1")
    except RunSetupError:
        pass  # reported inside the job as usual
    # imported only now (Lightning, timm, W&B: ~7 s on 2 cores), so that a bad override or a run folder with nothing
    # to resume is reported at once
    from hpa_lightning.reporting.wandb_hooks import WandbHooks
    from hpa_lightning.training.job import train

    adopt_lightning_loggers()
    hooks = WandbHooks()
    with JobGuard(cfg, hooks=hooks) as job:
        try:
            results = train(cfg, hooks)
        except UserError as err:
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise  # let Hydra mark this job failed and go on with the others
            job.fail(err)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        results = job.finish(results)
    return results.get("val", {}).get("macro_f1") if results else None


if __name__ == "__main__":
    run_hydra(main)
