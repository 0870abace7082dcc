"""A sweep's W&B workspace as code (`wandb-workspaces`): built from the sweep folder alone, offline, saved on demand.

    python -m hpa_lightning.dashboard outputs/multiruns/<date>_sweep-poster out=ws.json   # the spec, offline
    python -m hpa_lightning.dashboard outputs/multiruns/<date>_sweep-poster save=true     # into the W&B project

One function per section (`SECTIONS`); each takes the `Sweep` and returns a `Section`, so a panel is changed in one
place. Every key a panel names is one the sweep's runs log (reporting/wandb_run.py, wandb_panels.py):

- Curves: `val/macro_f1`, `val/loss` and each `lr/<group>` against the epoch, one line per arm (W&B job type) with
  the mean and min-max range over its seeds or folds.
- Sweep: parallel coordinates over exactly the swept keys (runs/swept.py; a swept config group is its
  `choices.<group>` config key), then `val/macro_f1` and the test metrics; parameter importance with respect to
  `val/macro_f1`; a run comparer (differences only).
- Best run: the per-class F1 table (`results/per_class`) of the runs, the best (by val macro F1) first and pinned
  when the W&B entity is known.
The workspace's runs are the sweep's group (its folder name unless `logger.wandb.group` says otherwise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hpa_lightning.errors import ConfigError, DataError
from hpa_lightning.runs import layout, swept

SPEC_FILE = "wandb_workspace.json"  # written into the sweep folder at the end of an offline multirun
TARGET = "val/macro_f1"
TEST_METRICS = ("test/macro_f1", "test/macro_f1_tuned", "test/roc_auc")
CURVES = ("val/macro_f1", "val/loss")
DEFAULT_PROJECT = "hpa_lightning"


@dataclass
class Sweep:
    """What the dashboard needs from a sweep folder."""

    dir: Path
    group: str
    project: str
    entity: str | None
    keys: list[str]                       # swept keys, bare (runs/swept.py)
    axes: list[str]                       # their W&B config keys, in the same order
    lr_keys: list[str] = field(default_factory=list)
    best: dict | None = None              # {"job": folder, "val_macro_f1": score, "run_id": W&B id or None}


def _wandb_node(multirun: dict) -> dict:
    from hpa_lightning.reporting.wandb_run import is_wandb_node

    return next((node for node in (multirun.get("logger") or {}).values() if node and is_wandb_node(node)), {})


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml"))


def _choice_groups(jobs: list[Path]) -> set[str]:
    """The config groups of the sweep's jobs (their `hydra.runtime.choices`): a swept group is plotted by its choice."""
    from omegaconf import OmegaConf

    for job in jobs:
        path = job / ".hydra" / "hydra.yaml"
        if path.is_file():
            return {str(k) for k in OmegaConf.load(path).hydra.runtime.choices}
    return set()


def _lr_keys(jobs: list[Path]) -> list[str]:
    """`lr/<group>` of the parameter groups the jobs trained (LRTrace's lr_trace.csv header)."""
    for job in jobs:
        path = job / layout.LR_TRACE
        if path.is_file():
            header = path.read_text().splitlines()[0].split(",")
            return [f"lr/{name}" for name in header if name not in ("step", "epoch")]
    return []


def wandb_run_id(job_dir: Path) -> str | None:
    """The W&B run id of a job (its `wandb/run-*-<id>` or `offline-run-*-<id>` folder), None without one."""
    runs = sorted((job_dir / "wandb").glob("*run-*-*"))
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


def _best(jobs: list[Path]) -> dict | None:
    scored = []
    for job in jobs:
        try:
            score = json.loads((job / layout.RESULTS).read_text())["val"]["macro_f1"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(score, (int, float)):
            scored.append((float(score), job))
    if not scored:
        return None
    score, job = max(scored, key=lambda pair: pair[0])
    return {"job": str(job), "val_macro_f1": score, "run_id": wandb_run_id(job)}


def read_sweep(sweep_dir: str | Path, project: str | None = None, entity: str | None = None) -> Sweep:
    """The sweep of `sweep_dir` (a Hydra multirun folder); DataError (one line) when it is none."""
    from hpa_lightning.reporting.wandb_run import CHOICES_KEY

    sweep_dir = Path(sweep_dir)
    multirun = swept.read_multirun(sweep_dir)
    if not multirun:
        raise DataError(f"{sweep_dir / swept.MULTIRUN_FILE}: not found; give the folder of a multirun (-m)")
    node = _wandb_node(multirun)
    jobs = _job_dirs(sweep_dir)
    keys = swept.sweep_keys_of(multirun)
    groups = _choice_groups(jobs)
    axes = [f"{CHOICES_KEY}.{key}" if key in groups else key for key in keys]
    return Sweep(dir=sweep_dir, group=str(node.get("group") or sweep_dir.name),
                 project=project or str(node.get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT),
                 entity=entity or node.get("entity") or os.environ.get("WANDB_ENTITY") or None,
                 keys=keys, axes=axes, lr_keys=_lr_keys(jobs), best=_best(jobs))


def curves_section(sweep: Sweep):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    panels = [wr.LinePlot(title=f"{key} per epoch, by arm (mean, min-max over seeds/folds)", x="epoch", y=[key],
                          groupby="JobType", groupby_aggfunc="mean", groupby_rangefunc="minmax")
              for key in (*CURVES, *sweep.lr_keys)]
    return ws.Section(name="Curves by arm", panels=panels, is_open=True)


def sweep_section(sweep: Sweep):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(axis), display_name=key)
               for key, axis in zip(sweep.keys, sweep.axes, strict=True)]
    columns += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(key)) for key in (TARGET, *TEST_METRICS)]
    panels = [wr.ParallelCoordinatesPlot(title="Swept keys against the scores", columns=columns),
              wr.ParameterImportancePlot(with_respect_to=TARGET),
              wr.RunComparer(diff_only="split")]
    return ws.Section(name="Sweep", panels=panels, is_open=True)


def best_run_section(sweep: Sweep):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    best = sweep.best
    title = "Per-class F1" + (f" (best: {Path(best['job']).name}, val macro F1 {best['val_macro_f1']:.4f})"
                              if best else "")
    return ws.Section(name=title[:100], panels=[wr.WeavePanelSummaryTable(table_name="results/per_class")],
                      is_open=True)


SECTIONS: tuple[Callable, ...] = (curves_section, sweep_section, best_run_section)


def runset_settings(sweep: Sweep):
    import wandb_workspaces.workspaces as ws

    pinned = [sweep.best["run_id"]] if sweep.best and sweep.best["run_id"] and sweep.entity else []
    return ws.RunsetSettings(filters=[ws.Metric("Group") == sweep.group],
                             order=[ws.Ordering(ws.Summary(TARGET), ascending=False)], pinned_runs=pinned)


def build_workspace(sweep: Sweep):
    import wandb_workspaces.workspaces as ws

    sections = [section(sweep) for section in SECTIONS]
    for i, section in enumerate(sections):
        for j, panel in enumerate(section.panels):
            panel._id = f"hpa{i}p{j}"  # wandb-workspaces draws random ids: the same sweep gives the same spec
    return ws.Workspace(entity=sweep.entity or "", project=sweep.project, name=f"sweep {sweep.group}"[:100],
                        sections=sections, runset_settings=runset_settings(sweep))


def spec_json(workspace) -> str:
    """The workspace's spec as `Workspace.save()` sends it (wandb-workspaces' `upsert_view2`)."""
    return workspace._to_model().spec.model_dump_json(by_alias=True, exclude_none=True)


def workspace_from_spec(text: str, entity: str, project: str, name: str = ""):
    """A `Workspace` built back from a spec written by `spec_json`."""
    from wandb_workspaces.workspaces import Workspace, internal

    view = internal.View(entity=entity, project=project, name="", display_name=name, id="",
                         spec=internal.WorkspaceViewspec.model_validate_json(text))
    return Workspace._from_model(view)


def wandb_api():
    """`wandb.Api()`, or ConfigError (one line) without an API key."""
    import wandb

    try:
        return wandb.Api()
    except wandb.errors.UsageError as err:
        raise ConfigError(f"no W&B API key ({err}): run `wandb login` or set WANDB_API_KEY") from None


def default_entity() -> str:
    entity = wandb_api().default_entity
    if not entity:
        raise ConfigError("no W&B entity: give entity=NAME (or set logger.wandb.entity / WANDB_ENTITY)")
    return entity


def save_workspace(workspace) -> str:
    """Save into the W&B project (needs an API key) and return its URL."""
    wandb_api()
    workspace.save()
    return workspace.url
