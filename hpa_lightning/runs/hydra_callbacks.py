"""Hydra callbacks of conf/hydra/default.yaml: `${hydra:...}` in the multirun controller, and a word about SLURM
jobs that pend (a Hydra callback rather than a launcher subclass: Hydra only accepts launchers from the
`hydra_plugins` namespace)."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback

from hpa_lightning.runs.slurm import PendingWatcher


class ControllerHydraConfig(Callback):
    """Hydra callback (conf/hydra/default.yaml): `${hydra:...}` resolvable while a multirun starts.

    Hydra 1.3 installs HydraConfig only inside jobs, so in a multirun's controller `hydra.sweep.dir:
    ${paths.log_dir}/...` (paths.root_dir is `${hydra:runtime.cwd}`) failed with "HydraConfig was not set" (Hydra
    issues 2247 and 3427, fixed after 1.3). The composed config already holds `hydra.runtime.cwd`; installing it
    before the sweeper starts is what the upstream fix does.
    """

    def on_multirun_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)


def _is_slurm_launcher(target: object) -> bool:
    """Whether a launcher `_target_` is submitit's SLURM launcher (or a subclass of it), by type."""
    from hydra.utils import get_object

    try:
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

        launcher = get_object(str(target))
    except Exception:  # noqa: BLE001 - no submitit plugin, or a launcher Hydra itself will report
        return False
    return isinstance(launcher, type) and issubclass(launcher, SlurmLauncher)


class ReportPendingJobs(Callback):
    """Runs a `PendingWatcher` over a multirun whose launcher is submitit's SLURM launcher; does nothing otherwise."""

    def __init__(self) -> None:
        self.watcher: PendingWatcher | None = None

    def __getstate__(self) -> dict:
        return {"watcher": None}  # submitit pickles the callbacks with each job; the watcher stays here

    def on_multirun_start(self, config, **kwargs) -> None:
        launcher = config.hydra.launcher
        if not _is_slurm_launcher(launcher.get("_target_")):
            return
        submitit_root = Path(str(launcher.submitit_folder).split("%j")[0]).resolve()
        self.watcher = PendingWatcher(submitit_root).__enter__()

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.watcher is not None:
            self.watcher.__exit__(None, None, None)
            self.watcher = None
