"""report.md for a single run: headline numbers, per-shift table, per-class table, confusion matrix."""

from __future__ import annotations

from pathlib import Path

from mmpeft.core.io import write_text
from mmpeft.report.plots import confusion_matrix_png

CONFUSION_PNG = "confusion_matrix.png"


def write_run_report(run_dir: Path, metrics: dict, names: list[str]) -> None:
    test = metrics["test"]
    if "skipped" in test:  # caption-only data: retrieval is the whole evaluation
        lines = [f"# Run `{run_dir.name}`", "", f"Recipe `{metrics['recipe']}`, backbone `{metrics['backbone']}`, "
                 f"method `{metrics['method']}`, seed {metrics['seed']}.", "", f"{test['skipped'].capitalize()}."]
        write_text(run_dir / "report.md", "\n".join(lines + retrieval_table(metrics) + training_lines(metrics) + [""]))
        return
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
        shift = next(iter(scores["shifts"]), "") if "shifts" in scores else ""
        name = f"{label} [{shift}]" if shift else label
        lines.append(f"| {name} | {scores['accuracy']:.4f} | {scores['macro_f1']:.4f} |")
    lines += shift_table(metrics) + retrieval_table(metrics)
    lines += training_lines(metrics)
    lines += ["", "## Per class (test)", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name in names:
        row = test["per_class"][name]
        lines.append(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1-score']:.3f} | "
                     f"{int(row['support'])} |")
    lines += ["", f"![confusion matrix]({CONFUSION_PNG})", ""]
    write_text(run_dir / "report.md", "\n".join(lines))


def training_lines(metrics: dict) -> list[str]:
    """Epochs, steps and time of training, and the validation score of every epoch."""
    train = metrics.get("train")
    if not train:
        return []
    lines = ["", f"Training: {train['epochs_run']} epochs, {train['steps']} steps, {train['seconds']:.1f} s "
             f"({train['samples_per_second']} samples/s); best val epoch: {train['best_epoch']}."]
    history = [h for h in train["history"] if "val_accuracy" in h]
    if history:
        lines += ["", "| epoch | val accuracy | val macro-F1 |", "|---|---|---|"]
        lines += [f"| {h['epoch']} | {h['val_accuracy']:.4f} | {h['val_macro_f1']:.4f} |" for h in history]
    return lines


def shift_table(metrics: dict) -> list[str]:
    """Accuracy of the test split under each image shift (`data.shift` first, then `data.eval_shifts`)."""
    test, zero_shot = metrics["test"], metrics.get("zero_shot") or {}
    if "shifts" not in test:
        return []
    lines = ["", "## Accuracy under each image shift (test)", ""]
    if zero_shot.get("shifts"):
        lines += ["| shift | zero-shot | after training | change |", "|---|---|---|---|"]
        for shift, scores in test["shifts"].items():
            before = zero_shot["shifts"][shift]["accuracy"]
            lines.append(f"| {shift} | {before:.4f} | {scores['accuracy']:.4f} | {scores['accuracy'] - before:+.4f} |")
    else:
        lines += ["| shift | after training |", "|---|---|"]
        lines += [f"| {shift} | {scores['accuracy']:.4f} |" for shift, scores in test["shifts"].items()]
    return lines


def retrieval_table(metrics: dict) -> list[str]:
    """Image->text and text->image Recall@K and median rank, zero-shot and after training."""
    retrieval = metrics.get("retrieval")
    if not retrieval:
        return []
    first = next(iter(retrieval.values()))
    i2t, t2i, shift = first["image_to_text"], first["text_to_image"], first.get("shift", "none")
    lines = ["", f"## Retrieval (test [{shift}]: {i2t['queries']} images, {t2i['queries']} texts)", "",
             "| evaluation | image->text R@1 | R@5 | R@10 | median rank | text->image R@1 | R@5 | R@10 | median rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, label in (("zero_shot", "zero-shot"), ("test", "after training")):
        if key in retrieval:
            cells = [f"{d['R@1']:.4f} | {d['R@5']:.4f} | {d['R@10']:.4f} | {d['median_rank']:g}"
                     for d in (retrieval[key]["image_to_text"], retrieval[key]["text_to_image"])]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return lines
