"""A regularisers grid's summary (per regulariser over seeds), its table, its plot and report.md.

Why these three numbers: average accuracy says how good the final model is on every task, average forgetting how
much of what each task reached was lost (lower is better), backward transfer the same loss measured from the
moment each task was learnt. The paired tests against the baseline (naive by default) use per-seed differences, so
variation that every regulariser of one seed shares (split, initialisation, batch order) cancels out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mmpeft.core.io import write_json, write_text
from mmpeft.core.schema import to_plain
from mmpeft.report.grid_plots import Point, forgetting_png
from mmpeft.report.grid_report import (
    _best,
    _bold,
    _mean,
    _num,
    _pm,
    failed_cells,
    groups_json,
    paired_text,
    std,
)
from mmpeft.report.stats import ALPHA, paired_test, summarize

# metric -> (table heading, which way is better)
METRICS = {"average_accuracy": ("average accuracy", max), "average_forgetting": ("average forgetting ↓", min),
           "backward_transfer": ("backward transfer", max), "final_control_accuracy": ("control accuracy", max)}
PAIRED = ("average_accuracy", "average_forgetting")
PLOT = "forgetting_vs_accuracy.png"


def summarize_regularisers(rows: Sequence[dict], labels: Sequence[str], baseline: str | None) -> list[dict]:
    """One entry per regulariser in grid order: stats over finished seeds, paired tests against the baseline."""
    ok = [r for r in rows if r["status"] == "ok"]
    base = {metric: {r["seed"]: r[metric] for r in ok if r["regulariser"] == baseline and r[metric] is not None}
            for metric in PAIRED}
    groups = []
    for label in labels:
        cells = [r for r in rows if r["regulariser"] == label]
        done = [r for r in cells if r["status"] == "ok"]
        entry: dict[str, Any] = {"regulariser": label, "seeds": len(done), "failed": len(cells) - len(done)}
        for metric in (*METRICS, "forward_transfer", "train_seconds"):
            entry[metric] = summarize([r[metric] for r in done])
        entry["trainable_params"] = _mean([r["trainable_params"] for r in done])
        entry["paired"] = None
        if baseline is not None and label != baseline:
            entry["paired"] = {metric: paired_test({r["seed"]: r[metric] for r in done if r[metric] is not None},
                                                   base[metric]) for metric in PAIRED}
        groups.append(entry)
    return groups


def regulariser_table(groups: Sequence[dict], baseline: str | None, zero_shot: dict[str, float | None]) -> str:
    """Markdown: mean ± std over seeds per regulariser; bold = best in its column (least forgetting is best).

    `zero_shot`: the untouched backbone's average accuracy and control accuracy, where measured.
    """
    shown = [m for m in METRICS if any(g[m].n for g in groups)]  # no control set: no control column
    header = ["regulariser", "seeds", *(f"{METRICS[m][0]} (mean ± std)" for m in shown), "train s"]
    header += [f"vs {baseline}: {METRICS[m][0].rstrip(' ↓')} (paired t-test)" for m in PAIRED] if baseline else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    finished = [g for g in groups if g["seeds"] > 0]
    best = {m: _best(finished, lambda g, m=m: g[m].mean, METRICS[m][1]) for m in shown}
    tail = " – |" * (len(PAIRED) if baseline else 0)
    if zero_shot.get("average_accuracy") is not None:
        cells = [_num(zero_shot.get(m), ".4f") for m in shown]
        lines.append("| untouched backbone (zero-shot) | – | " + " | ".join(cells) + " | 0 |" + tail)
    for g in groups:
        if g["seeds"] == 0:
            lines.append(f"| {g['regulariser']} | 0 ({g['failed']} failed) |" + " – |" * (len(shown) + 1) + tail)
            continue
        cells = [g["regulariser"], f"{g['seeds']}" + (f" ({g['failed']} failed)" if g["failed"] else "")]
        cells += [_bold(_pm(g[m]), g is best[m]) if g[m].n else "–" for m in shown]
        cells.append(f"{g['train_seconds'].mean:.1f}")
        if baseline:
            cells += ["baseline" if g["regulariser"] == baseline else paired_text(g["paired"][m]) for m in PAIRED]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Bold: best in its column (highest accuracy and transfer, lowest forgetting)."
              + (f" Paired t-test (scipy.stats.ttest_rel) per seed against `{baseline}`, alpha = {ALPHA}; with fewer "
                 "than 2 shared seeds there is no test." if baseline else
                 " No paired test: the grid has no `naive` entry (set grid.baseline to compare against another).")]
    if zero_shot.get("average_accuracy") is not None:
        lines.append("Untouched backbone: the mean over tasks of its zero-shot accuracy, each task scored as when "
                     "the sequence first meets it.")
    return "\n".join(lines) + "\n"


def write_regulariser_report(grid_dir: Path, setup, rows: Sequence[dict], groups: Sequence[dict],
                             metrics: dict | None) -> None:
    """summary.md/json, the forgetting-vs-accuracy plot and report.md (protocol, table, plot, failures, files)."""
    recipe = setup.recipe.recipe
    zero_shot = {"average_accuracy": (sum(metrics["zero_shot"]) / len(metrics["zero_shot"])
                                      if metrics and metrics.get("zero_shot") else None),
                 "final_control_accuracy": ((metrics or {}).get("control") or {}).get("zero_shot")}
    table = regulariser_table(groups, setup.baseline, zero_shot)
    write_text(grid_dir / "summary.md", f"# Summary: {recipe.name}\n\n{table}")
    write_json(grid_dir / "summary.json", summary_json(groups))
    points = [Point(g["regulariser"], g["average_forgetting"].mean, g["average_accuracy"].mean,
                    std(g["average_accuracy"]), std(g["average_forgetting"]))
              for g in groups if g["seeds"] > 0 and not math.isnan(g["average_forgetting"].mean)]
    forgetting_png(points, zero_shot["average_accuracy"], grid_dir / PLOT, f"{recipe.name}: accuracy vs forgetting")
    train = recipe.train
    split = (f"split seed {setup.split_seed}, shared by every cell" if setup.split_seed is not None else
             "each seed draws its own split (set data.split.seed to share one), shared by every regulariser of "
             "that seed")
    tasks = " -> ".join(_task_text(t) for t in (metrics or {}).get("tasks", [])) or \
        " -> ".join(t.name for t in setup.recipe.tasks)
    control = setup.recipe.control
    lines = [f"# Compare regularisers: {recipe.name}", "",
             f"{len(setup.regularisers)} regularisers x {len(setup.grid.seeds)} seeds = {len(rows)} cells, one task "
             "sequence each. Numbers are mean ± std over seeds.", "", "## Protocol", "",
             f"- Backbone: `{recipe.backbone.id}` ({recipe.backbone.dtype}); method `{recipe.method.name}` "
             f"(`{_settings(recipe.method)}`), the same in every cell.",
             f"- Tasks, in order: {tasks}."
             + (f" Protocol: {metrics['protocol']}." if metrics else ""),
             f"- Data: `{recipe.data.source}`; validation {recipe.data.split.val:.0%} and test "
             f"{recipe.data.split.test:.0%} of each task's images; {split}."
             + (f" Control set `{control.name}` (never trained on) is tested after every task." if control else ""),
             f"- Seeds: {', '.join(map(str, setup.grid.seeds))}; a seed sets the method's initialisation, the batch "
             "order and the regulariser's own draws (e.g. the replay memory).",
             f"- Budget per task, the same for every cell: {train.epochs} epochs, batch {train.batch_size}, lr "
             f"{train.lr:g}, weight decay {train.weight_decay:g}, warmup {train.warmup_ratio:g}, {train.optimizer}.",
             "- Metrics from the accuracy matrix R (R[i][j]: test accuracy on task j after training task i, T tasks): "
             "average accuracy = mean_j R[T-1][j]; average forgetting = mean over j < T-1 of max_l R[l][j] - "
             "R[T-1][j] (lower is better); backward transfer = mean over j < T-1 of R[T-1][j] - R[j][j].", "",
             "| label | regulariser | settings from | settings |", "|---|---|---|---|"]
    for entry in setup.regularisers:
        lines.append(f"| {entry.label} | {entry.config.name} | {entry.source} | `{_settings(entry.config)}` |")
    lines += ["", "## Results", "", table, "## Plot", "", f"![{PLOT}]({PLOT})"]
    lines += failed_cells(rows)
    lines += ["", "## Files", "", "`results.csv` / `results.json`: one row per cell (`results.json` also describes "
              "each column); `summary.md`, `summary.json`: the table above; `cells/<cell>/`: each cell's continual run "
              "folder (accuracy matrix, heatmap, report, adapter); `compare.yaml`: the resolved recipe "
              f"(`mmpeft {setup.command} --resume {grid_dir}` continues or re-checks the grid).", ""]
    write_text(grid_dir / "report.md", "\n".join(lines))


def summary_json(groups: Sequence[dict]) -> list[dict]:
    """The summary as plain JSON (statistics and paired tests as mappings, NaN as null)."""
    return groups_json([{**g, "paired": g["paired"] and {m: asdict(t) for m, t in g["paired"].items()}}
                        for g in groups])


def _task_text(task: dict) -> str:
    shift = "+".join(task.get("shift") or []) or "no shift"
    return f"`{task['name']}` (classes {', '.join(task['classes'])}; {shift})"


def _settings(config) -> dict:
    return {k: v for k, v in to_plain(config).items() if k != "name"}
