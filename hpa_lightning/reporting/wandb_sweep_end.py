"""Hydra callback (conf/hydra/default.yaml): at the end of a multirun logged to W&B, the sweep's dashboard.

Online, the workspace (reporting/wandb_dashboard.py) is saved to the sweep's W&B project and its URL printed; offline,
its spec is written to `<sweep>/wandb_workspace.json` and the two commands that publish it later are printed. Without
a W&B logger, or with `mode: disabled`, it does nothing. Trouble with W&B is a warning: the sweep's own outcome stands.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path

from hydra.experimental.callback import Callback

from hpa_lightning.files import write_text_atomic

log = logging.getLogger(__name__)


def wandb_mode(node) -> str:
    """online | offline | disabled, as the jobs' runs had it (reporting/wandb_run.py's rules)."""
    if node.get("offline"):
        return "offline"
    return str(node.get("mode") or os.environ.get("WANDB_MODE") or "online").lower()


def publish(sweep_dir: Path, mode: str) -> list[str]:
    """The dashboard of the sweep in `sweep_dir`: saved (online) or written as a spec (offline); the lines to print."""
    from hpa_lightning.reporting import wandb_dashboard as dashboard

    sweep = dashboard.read_sweep(sweep_dir)
    if mode == "online":
        if not sweep.entity:
            sweep.entity = dashboard.default_entity()
        return [f"W&B dashboard: {dashboard.save_workspace(dashboard.build_workspace(sweep))}"]
    spec = sweep_dir / dashboard.SPEC_FILE
    write_text_atomic(spec, dashboard.spec_json(dashboard.build_workspace(sweep)) + "\n")
    return [f"W&B dashboard (offline): {spec}", "publish it later with:",
            f"  wandb sync {sweep_dir}/*/wandb/offline-run-*",
            f"  python -m hpa_lightning.dashboard {sweep_dir} save=true"]


class SweepDashboard(Callback):
    """Publishes the dashboard when the multirun ends. Hydra's sweepers raise the first failed job's error after all
    jobs ran, before `on_multirun_end`: a sweep with a failed job gets its dashboard when the process exits."""

    def __init__(self) -> None:
        self._pending: tuple[Path, str] | None = None

    def on_multirun_start(self, config, **kwargs) -> None:
        from hpa_lightning.reporting.wandb_run import is_wandb_node

        node = next((n for n in (config.get("logger") or {}).values() if n is not None and is_wandb_node(n)), None)
        if node is None or wandb_mode(node) not in ("online", "offline"):
            return
        # resolved now: the folder's name holds the start time
        self._pending = (Path(str(config.hydra.sweep.dir)), wandb_mode(node))
        atexit.register(self._publish)

    def on_multirun_end(self, config, **kwargs) -> None:
        self._publish()

    def _publish(self) -> None:
        if self._pending is None:
            return
        (sweep_dir, mode), self._pending = self._pending, None
        try:
            lines = publish(sweep_dir, mode)
        except Exception as err:  # noqa: BLE001 - a dashboard is an extra; the jobs are done and recorded
            log.warning("W&B dashboard not made (python -m hpa_lightning.dashboard %s save=true): %s", sweep_dir, err)
            return
        print(f"\nsweep {sweep_dir.name}: {len(list(sweep_dir.glob('*/.hydra')))} jobs in {sweep_dir}")
        print("\n".join(lines), flush=True)
