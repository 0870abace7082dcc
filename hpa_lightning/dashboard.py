"""A sweep's W&B comparison workspace (curves by arm, parallel coordinates of the swept keys, parameter importance, run
comparer, per-class F1), built from the sweep folder with `wandb-workspaces`.

    python -m hpa_lightning.dashboard outputs/multiruns/<date>_sweep-poster out=ws.json   # the spec only, offline
    python -m hpa_lightning.dashboard outputs/multiruns/<date>_sweep-poster save=true     # into W&B; prints its URL

`project` and `entity` default to the sweep's `logger.wandb` settings (then WANDB_PROJECT / WANDB_ENTITY, then the
API key's default entity when saving). The panels: hpa_lightning/reporting/wandb_dashboard.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import UsageError, UserError

DEFAULTS: dict[str, object] = {"out": None, "save": False, "project": None, "entity": None}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv, DEFAULTS, "hpa_lightning.dashboard",
                                positional="sweep_dir")
    except UsageError as err:
        fail(err)
    sweep_dir = Path(args["sweep_dir"])
    if not sweep_dir.is_dir():
        fail(f"{sweep_dir}: no such folder")
    if not args["out"] and not args["save"]:
        fail("hpa_lightning.dashboard: nothing to do; give out=FILE.json (offline) and/or save=true")
    from hpa_lightning.reporting import wandb_dashboard as dashboard  # wandb-workspaces: only after the arguments

    try:
        sweep = dashboard.read_sweep(sweep_dir, project=args["project"], entity=args["entity"])
        if args["save"] and not sweep.entity:
            sweep.entity = dashboard.default_entity()
    except UserError as err:
        fail(err)
    workspace = dashboard.build_workspace(sweep)
    print(f"sweep {sweep.group}: axes {', '.join(sweep.axes) or '-'}; project {sweep.project}")
    if args["out"]:
        out = Path(args["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dashboard.spec_json(workspace) + "\n")
        print(f"workspace spec: {out}")
    if args["save"]:
        try:
            print(f"W&B workspace: {dashboard.save_workspace(workspace)}")
        except UserError as err:
            fail(err)
        except Exception as err:  # noqa: BLE001 - the server's refusal, reported as one line
            fail(f"could not save the workspace to W&B ({sweep.entity}/{sweep.project}): {err}", status=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
