"""The comparison report of a sweep (or of any runs and baselines): a table and the poster's figures.

    python -m hpa_lightning.report outputs/multiruns/<date>_sweep-poster            # -> <that folder>/report/
    python -m hpa_lightning.report outputs/multiruns/A outputs/runs out=reports/poster

What the report holds (results.csv, report.md, figures, unfinished jobs): hpa_lightning/reporting/report.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpa_lightning.cli import fail
from hpa_lightning.reporting.report import MARKDOWN_COLUMNS, markdown_table, write_report


def parse_args(argv: list[str]) -> tuple[list[Path], Path | None]:
    roots, out = [], None
    args = iter(argv)
    for arg in args:
        if arg.startswith("out="):
            out = Path(arg[4:])
        elif arg in ("--out", "-o"):
            out = Path(next(args))
        elif arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        else:
            roots.append(Path(arg))
    if not roots:
        fail("usage: python -m hpa_lightning.report DIR [DIR ...] [out=DIR]")
    return roots, out


def main(argv: list[str] | None = None) -> int:
    roots, out = parse_args(sys.argv[1:] if argv is None else argv)
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
    print(f"\nreport: {report['markdown']}  table: {report['csv']}  figures: "
          + ", ".join(str(p) for p in report["figures"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
