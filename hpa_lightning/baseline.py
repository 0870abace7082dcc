"""The poster's classical baselines: 28 one-vs-all scikit-learn classifiers on downsampled RGBY images.

    python -m hpa_lightning.baseline model=logreg          # one logistic regression per class
    python -m hpa_lightning.baseline model=random_forest   # one random forest per class
    python -m hpa_lightning.baseline model=random_forest model.estimator.n_estimators=50 features.grid=16

Same data path as `hpa_lightning.train`: the data config's packed store, stratified split, sample rows
(`data.max_samples` included) and train-only channel statistics. Each channel of the uint8 image is area-averaged
to `features.grid` x `features.grid` cells and standardised with the train mean/std (optionally with per-channel
intensity statistics), streamed from the memory map in chunks into float32. One classifier per class is fitted
on train (a class with no train positives predicts probability 0, one with only positives probability 1), the
per-class thresholds are tuned on val and the run folder has the layout of a deep run: results.json (written
last), test_predictions.csv, thresholds.json, split.csv, config.yaml.

The `model` options are the files of conf/baseline_model/, registered below as the `model` group of this entry
point's config (conf/model/ holds the deep models of `hpa_lightning.train`). Any scikit-learn classifier with
`predict_proba` can be used through `model.estimator._target_`. Returns the val macro F1 (at 0.5) for sweepers.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from hpa_lightning.classical.pipeline import run_baseline
from hpa_lightning.cli import hydra_task, run_hydra
from hpa_lightning.errors import UserError


@hydra.main(version_base="1.3", config_path="../conf", config_name="baseline")
@hydra_task
def main(cfg: DictConfig) -> float | None:
    try:
        results = run_baseline(cfg)
    except UserError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # let Hydra mark this job failed and go on with the others
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return results["val"]["macro_f1"]


if __name__ == "__main__":
    run_hydra(main)
