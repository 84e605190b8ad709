"""Plots of a compare grid: the efficiency frontier, accuracy against shots, accuracy against training time, and
(regularisers grids) average accuracy against average forgetting.

Each point is a method's mean over seeds with a +-1 std error bar; the zero-shot baseline is a dashed line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmpeft.report.plots import plt, save_figure


@dataclass(frozen=True)
class Point:
    label: str
    x: float
    y: float
    y_err: float = 0.0
    x_err: float = 0.0


def _zero_shot_line(axes, zero_shot: float | None) -> None:
    if zero_shot is not None:
        axes.axhline(zero_shot, color="grey", linestyle="--", linewidth=1, label="zero-shot")


def _finish(figure, axes, title: str, xlabel: str, path: Path,
            ylabel: str = "test accuracy (mean ± std over seeds)") -> None:
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, which="both", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # nothing labelled (a grid of zero-shot cells only): no empty legend
        axes.legend(fontsize=8, loc="best")
    save_figure(figure, path)


def _scatter(axes, points: Sequence[Point]) -> None:
    for index, point in enumerate(points):
        axes.errorbar(point.x, point.y, yerr=point.y_err or None, xerr=point.x_err or None, fmt="o", capsize=3,
                      color=f"C{index % 10}", label=point.label)
        axes.annotate(point.label, (point.x, point.y), textcoords="offset points", xytext=(5, 5), fontsize=8)


def efficiency_png(points: Sequence[Point], zero_shot: float | None, path: Path, title: str) -> None:
    """Accuracy against trainable parameters (log x): where a method sits on the efficiency frontier."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    shown = [p for p in points if p.x > 0]  # log axis: nothing trained (zero-shot) is the dashed line instead
    _scatter(axes, shown)
    _zero_shot_line(axes, zero_shot)
    if shown:
        axes.set_xscale("log")
    _finish(figure, axes, title, "trainable parameters (log scale)", path)


def shots_png(series: dict[str, list[tuple[int, float, float]]], zero_shot: float | None, path: Path,
              title: str, xlabel: str = "training examples per class (k, log scale)") -> None:
    """Accuracy against k (shots per class, log2 x) per method, {label: [(k, mean, std), ...]}."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    ticks: set[int] = set()
    for index, (label, values) in enumerate(series.items()):
        values = sorted(values)
        ks = [k for k, _, _ in values]
        ticks.update(ks)
        axes.errorbar(ks, [m for _, m, _ in values], yerr=[0 if s != s else s for _, _, s in values], marker="o",
                      capsize=3, color=f"C{index % 10}", label=label)
    _zero_shot_line(axes, zero_shot)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(ticks), [str(k) for k in sorted(ticks)])
    _finish(figure, axes, title, xlabel, path)


def time_png(points: Sequence[Point], zero_shot: float | None, path: Path, title: str) -> None:
    """Accuracy against training seconds: what a point of accuracy costs in wall time."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    shown = [p for p in points if p.x > 0]
    _scatter(axes, shown)
    _zero_shot_line(axes, zero_shot)
    if shown and max(p.x for p in shown) / min(p.x for p in shown) > 20:
        axes.set_xscale("log")
    _finish(figure, axes, title, "training seconds per cell (mean over seeds)", path)


def forgetting_png(points: Sequence[Point], zero_shot: float | None, path: Path, title: str) -> None:
    """Average accuracy against average forgetting (x: mean ± std over seeds): the best sit top left."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    _scatter(axes, points)
    if zero_shot is not None:
        axes.axhline(zero_shot, color="grey", linestyle="--", linewidth=1, label="untouched backbone (zero-shot)")
    _finish(figure, axes, title, "average forgetting (lower is better)", path,
            "average accuracy, final model (mean ± std over seeds)")
