"""A continual run's report: the accuracy matrix as a heatmap, accuracy per task over steps, and report.md."""

from __future__ import annotations

from pathlib import Path

from mmpeft.core.io import write_text
from mmpeft.report.plots import plt, save_figure

HEATMAP_PNG = "accuracy_matrix.png"
LINES_PNG = "accuracy_over_tasks.png"


def heatmap_png(matrix: list[list[float]], names: list[str], path: Path, title: str) -> None:
    """R[i][j] with row i = after training task i, column j = tested on task j; values printed in each cell."""
    size = max(3.5, 0.9 * len(names) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), [f"after {n}" for n in names])
    axes.set_xlabel("tested on task")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="accuracy")
    save_figure(figure, path)


def lines_png(metrics: dict, path: Path) -> None:
    """Accuracy on each task after each step (step 0: the untouched backbone, when measured); control dashed."""
    names = [t["name"] for t in metrics["tasks"]]
    matrix, zero_shot = metrics["accuracy_matrix"], metrics.get("zero_shot")
    steps = ["zero-shot"] * (zero_shot is not None) + [f"after {n}" for n in names]
    offset = 1 if zero_shot is not None else 0
    figure, axes = plt.subplots(figsize=(max(5.0, 1.2 * len(steps) + 2), 4))
    for j, name in enumerate(names):
        values = ([zero_shot[j]] if zero_shot is not None else []) + [row[j] for row in matrix]
        axes.plot(range(len(values)), values, marker="o", label=name)
        axes.axvline(j + offset, color="grey", alpha=0.15)
    control = metrics.get("control")
    if control and control["after_task"]:
        values = ([control["zero_shot"]] if offset and control["zero_shot"] is not None else []) + control["after_task"]
        start = len(steps) - len(values)
        axes.plot(range(start, len(steps)), values, "k--", marker="s", label=f"control: {control['name']}")
    axes.set_xticks(range(len(steps)), steps, rotation=30, ha="right")
    axes.set_ylim(-0.02, 1.02)
    axes.set_ylabel("test accuracy")
    axes.set_title(f"{metrics['regulariser']}: accuracy on each task over the sequence")
    axes.legend(fontsize="small", loc="best")
    save_figure(figure, path)


def write_continual_report(run_dir: Path, metrics: dict) -> None:
    names = [t["name"] for t in metrics["tasks"]]
    matrix = metrics["accuracy_matrix"]
    heatmap_png(matrix, names, run_dir / HEATMAP_PNG, f"{metrics['regulariser']}: accuracy matrix R")
    lines_png(metrics, run_dir / LINES_PNG)
    summary = metrics["summary"]
    lines = [f"# Continual run `{run_dir.name}`", "",
             f"Recipe `{metrics['recipe']}`, backbone `{metrics['backbone']}`, method `{metrics['method']}`, "
             f"regulariser `{metrics['regulariser']}`, seed {metrics['seed']}.", "",
             f"Protocol: {metrics['protocol']}.", "",
             "| task | classes | shift | train | test |", "|---|---|---|---|---|"]
    for task in metrics["tasks"]:
        lines.append(f"| {task['name']} | {', '.join(task['classes'])} | {'+'.join(task['shift']) or 'none'} | "
                     f"{task['counts']['train']} | {task['counts']['test']} |")
    lines += ["", "## Summary", "", "| metric | value |", "|---|---|"]
    for key, label in (("average_accuracy", "average accuracy (final model, all tasks)"),
                       ("average_incremental_accuracy", "average incremental accuracy"),
                       ("average_forgetting", "average forgetting"), ("backward_transfer", "backward transfer"),
                       ("forward_transfer", "forward transfer (vs zero-shot)"),
                       ("final_control_accuracy", "control accuracy after the last task")):
        value = summary.get(key)
        lines.append(f"| {label} | {'n/a' if value is None else f'{value:.4f}'} |")
    control = metrics.get("control")
    lines += ["", "## Accuracy matrix R (row: after training task i; column: tested on task j)", "",
              "| | " + " | ".join(names) + (f" | control: {control['name']} |" if control else " |"),
              "|---|" + "---|" * (len(names) + bool(control))]
    if metrics.get("zero_shot") is not None:
        cells = [f"{v:.4f}" for v in metrics["zero_shot"]]
        if control:
            cells.append("n/a" if control["zero_shot"] is None else f"{control['zero_shot']:.4f}")
        lines.append("| zero-shot | " + " | ".join(cells) + " |")
    for i, row in enumerate(matrix):
        cells = [f"**{v:.4f}**" if j == i else f"{v:.4f}" for j, v in enumerate(row)]
        if control:
            cells.append(f"{control['after_task'][i]:.4f}" if i < len(control["after_task"]) else "")
        lines.append(f"| after {names[i]} | " + " | ".join(cells) + " |")
    lines += ["", f"![accuracy matrix]({HEATMAP_PNG})", "", f"![accuracy over tasks]({LINES_PNG})", ""]
    params = metrics.get("params")
    if params:
        lines += [f"Trainable parameters: {params['trainable']:,} of {params['total']:,} ({params['percent']:.3f}%).",
                  ""]
    write_text(run_dir / "report.md", "\n".join(lines))
