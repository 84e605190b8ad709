"""A search's outputs from plain rows: the leaderboard (csv + md), the Pareto fronts and their plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mmpeft.core.io import write_csv, write_text

LEADERBOARD_COLUMNS = {
    "trial": "Optuna's trial number (its folder: trials/<3-digit number>-<label>, e.g. trials/004-lora)",
    "method": "the search.methods label the trial ran",
    "params": "the searched settings it drew",
    "state": "complete | pruned (successive halving stopped it at a rung) | stopped (the budget ran out) | failed",
    "epochs": "epochs it trained (counted in the budget)",
    "best_val": "best validation score over its epochs",
    "final_val": "validation score at its last epoch (what the search ranks complete trials by)",
    "trainable_params": "trainable parameters of its method",
    "train_seconds": "training time (the loop's own clock)",
    "pareto_params": "yes: no other complete trial is as good on final_val and trainable parameters and better on one",
    "pareto_time": "yes: no other complete trial is as good on final_val and training time and better on one",
    "dir": "its run folder, relative to the grid folder",
    "error": "a failed trial's error",
}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes: (score, cost) with a higher score better and a lower
    cost better. A point is beaten when another is at least as good on both and better on one; equal points are all
    on the front. In the order given."""
    front = []
    for i, (score, cost) in enumerate(points):
        beaten = any(s >= score and c <= cost and (s > score or c < cost) for j, (s, c) in enumerate(points) if j != i)
        if not beaten:
            front.append(i)
    return front


def mark_pareto(rows: list[dict]) -> None:
    """Set pareto_params / pareto_time (yes/no) on complete rows with the numbers they need; others get ""."""
    for column, cost in (("pareto_params", "trainable_params"), ("pareto_time", "train_seconds")):
        ranked = [r for r in rows if r["state"] == "complete" and _number(r.get("final_val"))
                  and _number(r.get(cost))]
        front = {id(ranked[i]) for i in pareto_front([(r["final_val"], r[cost]) for r in ranked])}
        for row in rows:
            row[column] = ("yes" if id(row) in front else "no") if any(row is r for r in ranked) else ""


def write_leaderboard(folder: Path, rows: list[dict], metric: str) -> None:
    """leaderboard.csv (every column) and leaderboard.md (best first) in `folder`."""
    columns = list(LEADERBOARD_COLUMNS)
    write_csv(folder / "leaderboard.csv", rows, columns)
    order = sorted(rows, key=lambda r: (r["state"] != "complete", -(r.get("final_val") or -math.inf), r["trial"]))
    lines = [f"# Search leaderboard ({metric}, validation only)", "",
             "| " + " | ".join(columns[:-2]) + " |", "|" + "---|" * (len(columns) - 2)]
    for row in order:
        lines.append("| " + " | ".join(_shown(row.get(k)) for k in columns[:-2]) + " |")
    failed = [r for r in order if r.get("error")]
    lines += ["", "Failed trials:", ""] + [f"- trial {r['trial']}: {r['error']}" for r in failed] if failed else []
    lines += ["", *[f"- `{k}`: {v}" for k, v in LEADERBOARD_COLUMNS.items()], ""]
    write_text(folder / "leaderboard.md", "\n".join(lines))


def pareto_png(path: Path, rows: list[dict], metric: str, title: str) -> bool:
    """Two panels: the metric against trainable parameters (log x) and against training time, complete trials only;
    each panel's front highlighted and connected. False (nothing written) when no complete trial has the numbers."""
    from mmpeft.report.plots import plt, save_figure

    done = [r for r in rows if r["state"] == "complete" and _number(r.get("final_val"))]
    if not done:
        return False
    figure, panels = plt.subplots(1, 2, figsize=(11, 4.2))
    for axes, cost, flag, label in ((panels[0], "trainable_params", "pareto_params", "trainable parameters"),
                                    (panels[1], "train_seconds", "pareto_time", "training time (s)")):
        points = [r for r in done if _number(r.get(cost))]
        axes.scatter([r[cost] for r in points], [r["final_val"] for r in points], color="0.6", label="trial")
        for r in points:
            axes.annotate(f"{r['trial']}-{r['method']}", (r[cost], r["final_val"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
        front = sorted((r for r in points if r.get(flag) == "yes"), key=lambda r: r[cost])
        axes.plot([r[cost] for r in front], [r["final_val"] for r in front], "o-", color="tab:red",
                  label="Pareto front")
        if cost == "trainable_params":
            log_ticks(axes, sorted({r[cost] for r in points}))
        axes.set_xlabel(label)
        axes.set_ylabel(f"{metric} (final epoch)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    save_figure(figure, path)
    return True


def log_ticks(axes, values: list[float]) -> None:
    """A log x axis labelled at the parameter counts themselves (a narrow range has no decade to label)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    axes.set_xscale("log")
    shown = values if len(values) <= 6 else values[:: max(1, len(values) // 6)]
    axes.xaxis.set_major_locator(FixedLocator(shown))
    axes.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:.3g}M" if x >= 1e6 else f"{x / 1e3:.3g}k" if x >= 1e3
                                   else f"{x:.0f}")
    axes.xaxis.set_minor_locator(NullLocator())
    axes.xaxis.set_minor_formatter(NullFormatter())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
