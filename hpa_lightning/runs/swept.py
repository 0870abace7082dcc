"""What a sweep varies, read from what Hydra saved: the swept keys, and each job's arm and tags.

A key is swept when the sweep's command line gives it several values (`optimizer.lr=0.01,0.02`, `range(...)`,
`choice(...)`, Optuna's `interval(...)`) or when the sweeper's own `params` list it (`+sweep=poster`, `lr`, `folds`,
`optuna` put theirs there). Both are in `<sweep>/multirun.yaml`, which every Hydra sweeper writes before its first
job starts, so a job reads it as well as the dashboard does afterwards.

An arm is what a job trains, its swept values minus the replicate keys (`seed`, `data.split.fold`): the jobs of one
arm differ only in seed or fold, and W&B draws them as one line with their range.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

MULTIRUN_FILE = "multirun.yaml"
# Keys whose values repeat an arm rather than define one (the curves of an arm show their mean and range).
REPLICATE_KEYS = ("seed", "data.split.fold")
# W&B refuses tags and job types longer than this.
WANDB_NAME_LIMIT = 64


def bare_key(key: str) -> str:
    """`+experiment` -> `experiment`, `~callbacks.ema` -> `callbacks.ema`: the key without its Hydra edit prefix."""
    return key.lstrip("+~")


def _parse(overrides: Iterable[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([str(o) for o in overrides])


def swept_keys(task_overrides: Iterable[str], sweeper_params: Mapping | None) -> list[str]:
    """The keys the sweep varies, bare, in command-line order after the sweeper's own `params`."""
    keys = [bare_key(str(key)) for key in (sweeper_params or {})]
    keys += [bare_key(o.key_or_group) for o in _parse(task_overrides) if o.is_sweep_override()]
    return list(dict.fromkeys(keys))


def read_multirun(sweep_dir: str | Path) -> dict:
    """`<sweep>/multirun.yaml` as a plain dict ({} when the folder has none)."""
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / MULTIRUN_FILE
    if not path.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def sweep_keys_of(multirun: Mapping) -> list[str]:
    """The swept keys of a sweep whose `multirun.yaml` is `multirun` (see `read_multirun`)."""
    hydra = multirun.get("hydra") or {}
    return swept_keys((hydra.get("overrides") or {}).get("task") or [], (hydra.get("sweeper") or {}).get("params"))


def job_values(job_overrides: Iterable[str], keys: Iterable[str]) -> dict[str, str]:
    """The values a job's own overrides (`.hydra/overrides.yaml`) give to `keys`, by bare key, in `keys` order."""
    given = {}
    for override in _parse(job_overrides):
        key = bare_key(override.key_or_group)
        if not override.is_delete():
            given[key] = override.input_line.split("=", 1)[1] if override.input_line else str(override.value())
    return {key: given[key] for key in keys if key in given}


def arm_of(values: Mapping[str, str]) -> str:
    """The arm of a job with swept `values`: `key=value` of its non-replicate keys, `,`-joined ("all" if none)."""
    arm = ",".join(f"{k}={v}" for k, v in values.items() if k not in REPLICATE_KEYS) or "all"
    return arm[:WANDB_NAME_LIMIT]


def tags_of(values: Mapping[str, str]) -> list[str]:
    return [f"{k}={v}"[:WANDB_NAME_LIMIT] for k, v in values.items()]
