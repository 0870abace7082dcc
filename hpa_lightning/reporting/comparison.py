"""The comparison report of a sweep (or of any runs and baselines): a table and the poster's figures (usage:
hpa_lightning/report.py).

Every `results.json` under the given folders (training runs of `hpa_lightning.train`, baselines of
`hpa_lightning.baseline`) becomes a row of `results.csv` and of the Markdown table in `report.md`: experiment,
model, loss, gamma, scheduler, base LR, val and test macro F1 at 0.5 and with tuned thresholds, test ROC AUC,
epochs, wall time, device/GPU, run folder. Runs with the same experiment name are told apart by the overrides in
which they differ (from `.hydra/overrides.yaml`, e.g. `optimizer.lr=0.01`).

Jobs that did not finish are listed too, never dropped: folders with `.hydra/` or `status.json` but no results.json
(`failed` with the error line from status.json/FAILED, `crashed`, `running`, or `incomplete` without a marker),
with the rerun that replaced them, if any (see `hpa_lightning.rerun_failed`); they are rows of results.csv with
their status and a section of report.md.

Figures (PNG, in the report folder): `test_macro_f1.png` (test macro F1 per experiment, at 0.5 and tuned) and
`test_roc_auc.png` (test macro ROC AUC per experiment), bar charts with baselines in grey. The LR-finder plots
(`lr_find.png`) and LR traces (`lr_trace.png`, the SGDR restarts) found in run folders are copied to `plots/` and
linked from report.md.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

from hpa_lightning.errors import DataError
from hpa_lightning.metrics import format_score
from hpa_lightning.runs import layout
from hpa_lightning.runs.ensemble import ensemble_evaluation
from hpa_lightning.runs.find import Job, find_jobs, natural_key

log = logging.getLogger(__name__)

COLUMNS = ["label", "status", "experiment", "model", "loss", "gamma", "scheduler", "averaging", "base_lr",
           "val_macro_f1", "val_macro_f1_tuned", "test_macro_f1", "test_macro_f1_tuned", "test_roc_auc", "test_map",
           "test_cell_map", "epochs", "wall_time_s", "device", "gpu", "run", "overrides", "error", "rerun"]


MARKDOWN_COLUMNS = [("label", "experiment"), ("model", "model"), ("loss", "loss"), ("gamma", "gamma"),
                    ("scheduler", "scheduler"), ("averaging", "weights"), ("base_lr", "base LR"),
                    ("val_macro_f1", "val F1 @0.5"), ("val_macro_f1_tuned", "val F1 tuned"),
                    ("test_macro_f1", "test F1 @0.5"), ("test_macro_f1_tuned", "test F1 tuned"),
                    ("test_roc_auc", "test ROC AUC"), ("test_map", "test mAP"), ("epochs", "epochs"),
                    ("wall_time_s", "time (s)"),
                    ("run", "run folder")]


BASELINE_MODELS = {"logreg", "random_forest"}


def _get(results: dict, split: str, key: str) -> float | None:
    value = (results.get(split) or {}).get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _relative(path: Path, roots: list[Path]) -> str:
    for root in roots:
        try:
            rel = path.resolve().relative_to(root.resolve())
        except ValueError:
            continue
        return str(Path(root.name) / rel) if len(roots) > 1 else (str(rel) if str(rel) != "." else root.name)
    return str(path)


def completed_row(job: Job, roots: list[Path]) -> dict:
    results = json.loads((job.dir / layout.RESULTS).read_text())
    gpu = results.get("gpu") or {}
    return {
        "status": "completed", "experiment": results.get("experiment") or job.dir.name,
        "model": results.get("model"), "loss": results.get("loss"), "gamma": results.get("gamma"),
        "scheduler": results.get("scheduler"), "base_lr": results.get("base_lr"),
        "averaging": (results.get("weight_averaging") or {}).get("method"),
        "val_macro_f1": _get(results, "val", "macro_f1"), "val_macro_f1_tuned": _get(results, "val", "macro_f1_tuned"),
        "test_macro_f1": _get(results, "test", "macro_f1"),
        "test_macro_f1_tuned": _get(results, "test", "macro_f1_tuned"),
        "test_roc_auc": _get(results, "test", "roc_auc"),
        "test_map": _get(results, "test", "mean_average_precision"), "epochs": results.get("epochs"),
        "test_cell_map": _get(results, "test", "cell_map"),  # a cell model scored against cell truth
        "wall_time_s": results.get("wall_time_s"), "device": results.get("device"),
        "gpu": gpu.get("device") if gpu else None, "run": _relative(job.dir, roots),
        "overrides": " ".join(job.overrides), "error": None,
        "rerun": None, "_dir": job.dir, "_overrides": job.overrides,
        "_rerun_of": job.rerun_of,
    }


def problem_row(job: Job, roots: list[Path]) -> dict:
    return {"status": job.status, "experiment": None, "run": _relative(job.dir, roots),
            "overrides": " ".join(job.overrides), "error": job.error, "rerun": None, "_dir": job.dir,
            "_overrides": job.overrides, "_rerun_of": job.rerun_of}


def _short(value: str) -> str:
    """Sampled floats (Optuna) shortened to 4 significant digits for labels."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if "." not in value and "e" not in value.lower() else f"{number:.4g}"


def _override_map(overrides: list[str]) -> dict[str, str]:
    out = {}
    for override in overrides:
        key, _, value = override.partition("=")
        out[key.lstrip("+~")] = _short(value)
    return out


def assign_labels(rows: list[dict]) -> None:
    """`label`: the experiment name, plus the overrides that differ among runs of the same experiment."""
    by_experiment: dict[str, list[dict]] = {}
    for row in rows:
        by_experiment.setdefault(str(row["experiment"]), []).append(row)
    for experiment, group in by_experiment.items():
        if len(group) == 1:
            group[0]["label"] = experiment
            continue
        maps = [_override_map(row["_overrides"]) for row in group]
        keys = sorted({k for m in maps for k in m})
        differing = [k for k in keys if len({m.get(k) for m in maps}) > 1 and k != "experiment"]
        for row, m in zip(group, maps, strict=True):
            extra = " ".join(f"{k}={m[k]}" for k in differing if k in m)
            row["label"] = f"{experiment} {extra}".strip()
    seen: dict[str, int] = {}
    for row in rows:
        seen[row["label"]] = seen.get(row["label"], 0) + 1
    for row in rows:
        if seen[row["label"]] > 1:
            row["label"] = f"{row['label']} ({Path(row['run']).name})"


def fold_ensembles(completed: list[dict], roots: list[Path]) -> list[dict]:
    """A row for each set of finished runs that are the folds of one split (same folder, same overrides but
    `data.split.fold`): their ensemble, mean probabilities with thresholds tuned out of fold (runs/ensemble.py)."""
    groups: dict[tuple, list[dict]] = {}
    for row in completed:
        overrides = _override_map(row["_overrides"])
        if "data.split.fold" in overrides:
            same = tuple(sorted((k, v) for k, v in overrides.items() if k != "data.split.fold"))
            groups.setdefault((row["_dir"].parent.resolve(), same), []).append(row)
    rows = []
    for (parent, _), members in groups.items():
        if len(members) < 2:
            continue
        try:
            evaluation = ensemble_evaluation([row["_dir"] for row in members])
        except DataError as err:
            log.warning("no ensemble of %d folds under %s: %s", len(members), parent, err)
            continue
        if evaluation["validation"] != "out_of_fold":
            continue
        first = members[0]
        rows.append({
            **{key: first.get(key) for key in ("experiment", "model", "loss", "gamma", "scheduler", "averaging",
                                               "base_lr", "device", "gpu")},
            "status": "ensemble", "label": f"{first['experiment']} ensemble of {len(members)} folds",
            "val_macro_f1": _get(evaluation, "val", "macro_f1"),
            "val_macro_f1_tuned": _get(evaluation, "val", "macro_f1_tuned"),
            "test_macro_f1": _get(evaluation, "test", "macro_f1"),
            "test_macro_f1_tuned": _get(evaluation, "test", "macro_f1_tuned"),
            "test_roc_auc": _get(evaluation, "test", "roc_auc"),
            "test_map": _get(evaluation, "test", "mean_average_precision"), "epochs": None,
            "wall_time_s": sum(row.get("wall_time_s") or 0 for row in members), "run": _relative(parent, roots),
            "overrides": "", "error": None, "rerun": None, "_dir": parent, "_overrides": [], "_rerun_of": None})
    return rows


def gather(roots: list[Path]) -> tuple[list[dict], list[dict], list[Job]]:
    """(completed rows, rows of jobs that did not finish, LR-finder jobs) under `roots`."""
    jobs: dict[Path, Job] = {}
    for root in roots:
        for job in find_jobs(root):
            jobs.setdefault(job.dir.resolve(), job)
    completed, problems, lr_finds = [], [], []
    for job in sorted(jobs.values(), key=lambda j: natural_key(str(j.dir))):
        if job.status == "completed":
            completed.append(completed_row(job, roots))
        elif job.status == "lr_find":
            lr_finds.append(job)
        else:
            problems.append(problem_row(job, roots))
    # a failed job replaced by a successful rerun says so; a completed rerun names the job it replaced
    for row in completed:
        if row["_rerun_of"] is not None:
            for problem in problems:
                if problem["_dir"].resolve() == Path(row["_rerun_of"]).resolve():
                    problem["rerun"] = row["run"]
                    row["rerun"] = f"rerun of {problem['run']}"
    assign_labels(completed)
    completed += fold_ensembles(completed, roots)
    for row in problems:
        row["label"] = Path(row["run"]).name
    return completed, problems, lr_finds


def _fmt(value, key: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if key == "base_lr":
            return f"{value:g}"
        if key in ("wall_time_s",):
            return f"{value:.0f}"
        if key == "gamma":
            return f"{value:g}"
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key), key) for key, _ in columns) + " |")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:120] or "run"


def bar_chart(rows: list[dict], series: list[tuple[str, str]], title: str, ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [row["label"] for row in rows]
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, min(14.0, 0.6 * len(rows) * len(series) + 2)), 4.8))
    colours = ["tab:blue", "tab:orange", "tab:green"]
    for k, (key, name) in enumerate(series):
        values = [row.get(key) if row.get(key) is not None else 0.0 for row in rows]
        colour = [("tab:gray" if row.get("model") in BASELINE_MODELS else colours[k]) for row in rows]
        offset = (k - (len(series) - 1) / 2) * width
        bars = ax.bar(x + offset, values, width, label=name, color=colour,
                      alpha=1.0 if k == len(series) - 1 else 0.6, edgecolor="black", linewidth=0.4)
        for bar, row in zip(bars, rows, strict=True):
            value = row.get(key)
            ax.annotate("n/a" if value is None else f"{value:.3f}", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    top = max([row.get(key) or 0.0 for row in rows for key, _ in series] + [0.0])
    ax.set_ylim(0, min(1.0, top * 1.18 + 0.02) if top > 0 else 1.0)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def copy_plots(completed: list[dict], lr_finds: list[Job], roots: list[Path], out: Path) -> list[tuple[str, str, str]]:
    """Copy lr_find.png / lr_trace.png into out/plots; (label, kind, relative path) for each."""
    plots = []
    folder = out / "plots"
    sources = [(row["label"], row["_dir"]) for row in completed]
    sources += [(_relative(job.dir, roots), job.dir) for job in lr_finds]
    for label, run_dir in sources:
        for name, kind in (("lr_find.png", "LR finder"), ("lr_trace.png", "LR trace")):
            source = Path(run_dir) / name
            if source.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                target = folder / f"{_slug(label)}_{name}"
                shutil.copyfile(source, target)
                plots.append((label, kind, str(target.relative_to(out))))
    return plots


def write_report(roots: list[Path], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    completed, problems, lr_finds = gather(roots)
    rows = completed + problems
    import pandas as pd

    frame = pd.DataFrame([{c: row.get(c) for c in COLUMNS} for row in rows], columns=COLUMNS)
    frame.to_csv(out / "results.csv", index=False)

    figures = {}
    if completed:
        figures["test_macro_f1"] = out / "test_macro_f1.png"
        bar_chart(completed, [("test_macro_f1", "threshold 0.5"), ("test_macro_f1_tuned", "tuned thresholds")],
                  "Test macro F1 per experiment", "macro F1", figures["test_macro_f1"])
        figures["test_roc_auc"] = out / "test_roc_auc.png"
        bar_chart(completed, [("test_roc_auc", "ROC AUC")], "Test macro ROC AUC per experiment", "macro ROC AUC",
                  figures["test_roc_auc"])
    plots = copy_plots(completed, lr_finds, roots, out)

    md = ["# Comparison report", "", "Sources: " + ", ".join(f"`{root}`" for root in roots), "",
          f"{len(completed)} completed run(s), {len(problems)} job(s) that did not finish.", ""]
    if completed:
        # chosen on validation, reported on test: picking the best test score would be an optimistic estimate
        scored = [row for row in completed if row.get("val_macro_f1") is not None]
        if scored:
            best = max(scored, key=lambda row: row["val_macro_f1"])
            test = {key: format_score(best.get(f"test_{key}"))
                    for key in ("macro_f1", "macro_f1_tuned", "roc_auc", "map")}
            md += [f"Best on validation (val macro F1 @0.5 {best['val_macro_f1']:.4f}): **{best['label']}**; its test "
                   f"macro F1: {test['macro_f1']} @0.5, {test['macro_f1_tuned']} with tuned thresholds, ROC AUC "
                   f"{test['roc_auc']}" + (f", mAP {test['map']}" if best.get("test_map") is not None else "")
                   + ".", ""]
        averaged = any(row.get("averaging") for row in completed)  # the weights column only where EMA/SWA ran
        columns = [c for c in MARKDOWN_COLUMNS if c[0] != "averaging" or averaged]
        if any(row.get("test_cell_map") is not None for row in completed):  # cell models scored on cell truth
            columns.insert(columns.index(("test_map", "test mAP")) + 1, ("test_cell_map", "test cell mAP"))
        columns += [("rerun", "note")] if any(row.get("rerun") for row in completed) else []
        md += ["## Results", "", markdown_table(completed, columns), "",
               "F1 @0.5: macro F1 with every class at threshold 0.5; tuned: per-class thresholds tuned on val. "
               "ROC AUC: macro over the classes with test positives and negatives.", "",
               "![test macro F1](test_macro_f1.png)", "", "![test ROC AUC](test_roc_auc.png)", ""]
    if problems:
        md += ["## Failed or unfinished jobs", "",
               markdown_table(problems, [("run", "job folder"), ("status", "status"), ("error", "error"),
                                         ("overrides", "overrides"), ("rerun", "replaced by rerun")]), "",
               "Rerun the failed ones with `python -m hpa_lightning.rerun_failed <sweep folder>`.", ""]
    if plots:
        md += ["## Plots", ""]
        for label, kind, rel in plots:
            md.append(f"- {kind}, {label}: [{rel}]({rel})")
        md.append("")
        for label, kind, rel in plots:
            if kind == "LR finder":
                md += [f"![{kind} {label}]({rel})", ""]
    (out / "report.md").write_text("\n".join(md).rstrip("\n") + "\n")
    return {"completed": completed, "problems": problems, "plots": plots, "figures": figures,
            "markdown": out / "report.md", "csv": out / "results.csv"}
