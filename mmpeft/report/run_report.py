"""report.md for a single run: headline numbers, per-shift table, per-class table, confusion matrix."""

from __future__ import annotations

from pathlib import Path

from mmpeft.io import write_text
from mmpeft.report.plots import confusion_matrix_png

CONFUSION_PNG = "confusion_matrix.png"


def write_run_report(run_dir: Path, metrics: dict, names: list[str]) -> None:
    test = metrics["test"]
    confusion_matrix_png(test["confusion_matrix"], names, run_dir / CONFUSION_PNG,
                         f"{metrics['method']} on test ({test['n']} images)")
    lines = [f"# Run `{run_dir.name}`", "",
             f"Recipe `{metrics['recipe']}`, backbone `{metrics['backbone']}`, method `{metrics['method']}`, "
             f"seed {metrics['seed']}.", ""]
    params = metrics.get("params")
    if params:
        lines += [f"Trainable parameters: **{params['trainable']:,}** of {params['total']:,} "
                  f"({params['percent']:.3f}%).", ""]
    lines += ["| evaluation | accuracy | macro-F1 |", "|---|---|---|"]
    for label, scores in (("zero-shot", metrics.get("zero_shot")), ("after training", test)):
        if scores is None:
            continue
        for shift, shifted in scores.get("shifts", {"": scores}).items():
            name = f"{label} [{shift}]" if shift else label
            lines.append(f"| {name} | {shifted['accuracy']:.4f} | {shifted['macro_f1']:.4f} |")
    train = metrics.get("train")
    if train:
        lines += ["", f"Training: {train['epochs_run']} epochs, {train['steps']} steps, {train['seconds']:.1f} s "
                  f"({train['samples_per_second']} samples/s); best val epoch: {train['best_epoch']}."]
        history = [h for h in train["history"] if "val_accuracy" in h]
        if history:
            lines += ["", "| epoch | val accuracy | val macro-F1 |", "|---|---|---|"]
            lines += [f"| {h['epoch']} | {h['val_accuracy']:.4f} | {h['val_macro_f1']:.4f} |" for h in history]
    lines += ["", "## Per class (test)", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name in names:
        row = test["per_class"][name]
        lines.append(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1-score']:.3f} | "
                     f"{int(row['support'])} |")
    lines += ["", f"![confusion matrix]({CONFUSION_PNG})", ""]
    write_text(run_dir / "report.md", "\n".join(lines))
