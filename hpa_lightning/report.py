"""The comparison report of a sweep (or of any runs and baselines): a table and the poster's figures.

    python -m hpa_lightning.report outputs/multiruns/<date>_sweep-poster            # -> <that folder>/report/
    python -m hpa_lightning.report outputs/multiruns/A outputs/runs out=reports/poster
    python -m hpa_lightning.report outputs/multiruns/<date>_sweep-poster wandb=true  # also as a W&B report

What the report holds (results.csv, report.md, figures, unfinished jobs): hpa_lightning/reporting/comparison.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import UsageError
from hpa_lightning.reporting.comparison import MARKDOWN_COLUMNS, markdown_table, write_report


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv, {"out": None, "wandb": False},
                                "hpa_lightning.report", positional="folders", many=True)
    except UsageError as err:
        fail(err)
    roots, out = [Path(folder) for folder in args["folders"]], args["out"] and Path(args["out"])
    for root in roots:
        if not root.is_dir():
            print(f"error: {root}: no such folder", file=sys.stderr)
            return 2
    out = out or (roots[0] / "report" if len(roots) == 1 else Path("report"))
    report = write_report(roots, out)
    if not report["completed"] and not report["problems"]:
        print(f"error: no results.json or job folders under {', '.join(map(str, roots))}", file=sys.stderr)
        return 2
    print(markdown_table(report["completed"], MARKDOWN_COLUMNS) if report["completed"] else "(no completed runs)")
    for row in report["problems"]:
        print(f"{row['status'].upper()}: {row['run']}: {row['error'] or '-'}"
              + (f" (replaced by {row['rerun']})" if row["rerun"] else ""))
    if args["wandb"]:  # the same table and figures as a W&B report in the sweep's project
        if len(roots) != 1:
            fail("hpa_lightning.report: wandb=true takes one sweep folder")
        from hpa_lightning.errors import UserError
        from hpa_lightning.reporting.wandb_report import publish_report

        try:
            print(f"W&B report: {publish_report(roots[0], report)}")
        except UserError as err:
            fail(err)
        except Exception as err:  # noqa: BLE001 - the server's refusal, one line
            fail(f"could not publish the report to W&B: {err}", status=1)
    print(f"\nreport: {report['markdown']}  table: {report['csv']}  figures: "
          + ", ".join(str(p) for p in report["figures"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
