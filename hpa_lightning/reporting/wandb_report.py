"""The comparison report (reporting/comparison.py) as a W&B report next to the sweep's workspace (`wandb-workspaces`).

`python -m hpa_lightning.report SWEEP_DIR wandb=true`: a report in the sweep's W&B project holding the comparison
table (Markdown), the report's figures (embedded as PNG data URLs, so nothing is uploaded besides the report itself)
and a panel grid over the sweep's runs (its group) with the dashboard's parallel coordinates. Unlike the workspace, a
report cannot be built offline: wandb-workspaces looks the project up on the server while building it.
"""

from __future__ import annotations

import base64
from pathlib import Path


def build_report(sweep_dir: Path, report: dict):
    import wandb_workspaces.reports.v2 as wr

    from hpa_lightning.reporting import wandb_dashboard as dashboard

    sweep = dashboard.read_sweep(sweep_dir)
    if not sweep.entity:
        sweep.entity = dashboard.default_entity()
    [parallel] = [p for p in dashboard.sweep_section(sweep).panels if isinstance(p, wr.ParallelCoordinatesPlot)]
    blocks = [wr.H1(text=f"Sweep {sweep.group}: comparison"),
              wr.MarkdownBlock(text=Path(report["markdown"]).read_text())]
    for name, path in report["figures"].items():
        data = base64.b64encode(Path(path).read_bytes()).decode()
        blocks.append(wr.Image(url=f"data:image/png;base64,{data}", caption=str(name)))
    runset = wr.Runset(entity=sweep.entity, project=sweep.project, name=sweep.group,
                       filters=f"Group = '{sweep.group}'")
    blocks.append(wr.PanelGrid(runsets=[runset], panels=[parallel]))
    return wr.Report(entity=sweep.entity, project=sweep.project, title=f"Sweep {sweep.group}"[:100],
                     description="python -m hpa_lightning.report", blocks=blocks)


def publish_report(sweep_dir: Path, report: dict) -> str:
    """Save the report to W&B (needs an API key); its URL."""
    from hpa_lightning.reporting.wandb_dashboard import wandb_api

    wandb_api()
    saved = build_report(sweep_dir, report)
    saved.save()
    return saved.url
