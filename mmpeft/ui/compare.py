"""Side by side: the numbers of several runs or grid rows as one Markdown table, the best of each column in bold.

Runs and cells contribute their metrics.json; a grid contributes one row per method from its summary.json (means
over seeds), with the paired test against the grid's baseline that the grid itself computed. Nothing is recomputed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mmpeft.grids.base import GRID_RECIPE
from mmpeft.runs.folder import METRICS_FILE
from mmpeft.ui.catalog import continual_seconds, inside

# column -> True where higher is better (accuracy), False where lower is (parameters, time)
METRIC_COLUMNS = {"accuracy": True, "macro-F1": True, "trainable params": False, "trainable %": False,
                  "train s": False}


def comparison_rows(root: str | Path, selected: list[str]) -> list[dict]:
    """One row per selected run or cell, and per method of each selected grid."""
    rows: list[dict] = []
    for relative in selected:
        folder = inside(root, relative)
        try:
            if (folder / GRID_RECIPE).is_file():
                rows += _grid_rows(folder, relative)
            elif (folder / METRICS_FILE).is_file():
                rows.append(_run_row(folder, relative))
            else:
                rows.append({"row": relative, "note": "not finished: no numbers yet"})
        except (OSError, ValueError, AttributeError, TypeError) as error:  # a hand-edited or truncated file
            what = "summary.json" if (folder / GRID_RECIPE).is_file() else METRICS_FILE
            rows.append({"row": relative, "note": f"damaged: its {what} cannot be read ({type(error).__name__})"})
    return rows


def _run_row(folder: Path, relative: str) -> dict:
    metrics = json.loads((folder / METRICS_FILE).read_text())
    params, train = metrics.get("params") or {}, metrics.get("train") or {}
    test = metrics.get("test") or {}
    summary = metrics.get("summary") or {}  # a continual run: its average accuracy over tasks
    return {"row": relative, "method": metrics.get("method", ""),
            "accuracy": test.get("accuracy", summary.get("average_accuracy")), "macro-F1": test.get("macro_f1"),
            "trainable params": params.get("trainable"), "trainable %": params.get("percent"),
            "train s": train.get("seconds") if isinstance(train, dict) else continual_seconds(metrics),
            "paired test": ""}


def _grid_rows(folder: Path, relative: str) -> list[dict]:
    path = folder / "summary.json"
    if not path.is_file():
        return [{"row": relative, "note": "grid not finished: no summary.json yet"}]
    rows = []
    for group in json.loads(path.read_text()):
        label = group.get("method") or group.get("regulariser") or ""
        shots = group.get("shots")
        rows.append({"row": f"{relative} : {label}" + (f" (k={shots})" if shots is not None else ""),
                     "method": label, "accuracy": _mean(group.get("accuracy") or group.get("average_accuracy")),
                     "macro-F1": _mean(group.get("macro_f1")), "trainable params": group.get("trainable_params"),
                     "trainable %": group.get("trainable_percent"), "train s": _mean(group.get("train_seconds")),
                     "paired test": paired_text(group.get("paired"))})
    return rows


def paired_text(paired: dict | None) -> str:
    """The grid's own paired t-test against its baseline: difference, p-value, verdict."""
    if not paired:
        return ""
    if "verdict" not in paired and all(isinstance(v, dict) for v in paired.values()):  # regularisers: per metric
        return "; ".join(f"{metric}: {paired_text(test)}" for metric, test in paired.items())
    difference, p = paired.get("mean_difference"), paired.get("p")
    numbers = [f"Δ {difference:+.4f}" if _number(difference) else "", f"p = {p:.3g}" if _number(p) else ""]
    return ", ".join([n for n in numbers if n] + [str(paired.get("verdict", "")), f"n={paired.get('n')}"])


def markdown_table(rows: list[dict]) -> str:
    """The rows as Markdown, the best number of each metric column in bold (ties all bold)."""
    if not rows:
        return "*Pick runs, cells or grids to compare.*"
    columns = ["row", "method", *METRIC_COLUMNS, "paired test"]
    best = {}
    for column, higher in METRIC_COLUMNS.items():
        values = [r[column] for r in rows if _number(r.get(column))]
        if len(values) > 1:
            best[column] = max(values) if higher else min(values)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if "note" in row:
            lines.append(f"| {row['row']} | {row['note']} |" + " |" * (len(columns) - 2))
            continue
        cells = []
        for column in columns:
            value = row.get(column)
            text = _format(column, value)
            cells.append(f"**{text}**" if column in best and _number(value) and value == best[column] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nBold: best in its column (higher accuracy, fewer parameters, less time)."


def comparison_plots(rows: list[dict], folder: Path) -> list[Path]:
    """The compared rows on one axis each: accuracy against trainable parameters (log x) and against training
    time, drawn by the grids' own plot functions into `folder` (the web app's RUNS_DIR/.ui/compare)."""
    from mmpeft.report.grid_plots import Point, efficiency_png, time_png

    written = []
    for name, column, draw, what in (("accuracy_vs_params", "trainable params", efficiency_png, "trainable parameters"),
                                     ("accuracy_vs_time", "train s", time_png, "training time")):
        points = [Point(r["row"], float(r[column]), float(r["accuracy"])) for r in rows
                  if _number(r.get("accuracy")) and _number(r.get(column)) and r[column] > 0]
        if points:
            folder.mkdir(parents=True, exist_ok=True)
            draw(points, None, folder / f"{name}.png", f"compared: accuracy vs {what}")
            written.append(folder / f"{name}.png")
    return written


def _format(column: str, value) -> str:
    if not _number(value):
        return "–" if value in (None, "") else str(value).replace("|", "/")
    if column == "trainable params":
        return f"{int(value):,}"
    return f"{value:.3f}" if column in ("trainable %",) else (f"{value:.1f}" if column == "train s" else f"{value:.4f}")


def _mean(summary) -> float | None:
    return summary.get("mean") if isinstance(summary, dict) else summary


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
