"""`predict(source, images)`: what a trained model says about new images, from a run folder or either export kind.

Dual encoders score the run's own label texts (or labels given now: zero-shot on new classes, written with the
run's templates); generative models answer through the chat template, or score labels when labels are given.
Unreadable images become `{"path", "error"}` rows: one bad file never ends the whole job.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmpeft.artifacts.loading import MANIFEST, labels_of, load_adapter, read_manifest
from mmpeft.artifacts.runs import ExportError, read_run, rebuild, run_data
from mmpeft.backbones import Backbone
from mmpeft.core.io import atomic_path
from mmpeft.data import LabelSet, load_image
from mmpeft.data.sources import IMAGE_EXTENSIONS
from mmpeft.runs.folder import RECIPE_FILE

logger = logging.getLogger("mmpeft")

DEFAULT_BATCH_SIZE = 16
TABLE_ROWS = 20  # rows shown on the terminal; the JSON lines hold all of them


@dataclass
class Predictor:
    """A loaded model with the label set it was trained for and the templates that write new labels' texts."""

    backbone: Backbone
    labels: LabelSet
    templates: list[str]


def predict(source: str | Path, images: str | Path | Sequence[str | Path], labels: Sequence[str] | None = None,
            top_k: int = 5, question: str | None = None, out: str | Path | None = None,
            batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict]:
    """Rows `{"path", "labels": [{"label", "score"}, ...]}` (top_k, scores are probabilities over the labels),
    `{"path", "answer"}` (generative, no labels) or `{"path", "error"}` (an unreadable image), in input order;
    with `out`, also written as JSON lines (complete or absent). Folders are walked recursively."""
    if top_k < 1:
        raise ValueError(f"top_k: {top_k} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size} must be >= 1")
    paths = image_paths(images)
    predictor = open_predictor(source)
    backbone = predictor.backbone
    answering = backbone.family == "generative" and not labels
    if question is not None:
        if backbone.family != "generative":
            raise ValueError(f"question: {source} is a {backbone.family} model, which scores labels and answers no "
                             "questions; drop --question")
        backbone.apply_task_settings({**backbone.task_settings(), "question": question})
    label_set = None if answering else choose_labels(predictor, labels, source)
    targets = None
    if label_set is not None and backbone.head is None:
        with torch.no_grad():
            targets = backbone.class_text_features(label_set)
    rows: list[dict] = []
    with rows_writer(out) as write:
        bar = tqdm(total=len(paths), desc="predict", unit="image", disable=None if len(paths) > batch_size else True)
        for start in range(0, len(paths), batch_size):
            batch = paths[start:start + batch_size]
            found = predict_batch(backbone, batch, label_set, targets, top_k, answering)
            for row in found:
                write(row)
            rows += found
            bar.update(len(batch))
        bar.close()
    return rows


def image_paths(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files as given; folders walked (sorted, hidden files and non-image extensions skipped)."""
    given = [images] if isinstance(images, (str, Path)) else list(images)
    if not given:
        raise ValueError("images: give at least one image file or folder")
    paths: list[Path] = []
    for item in map(Path, given):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                logger.warning("%s: no image files (%s) in this folder", item, ", ".join(sorted(IMAGE_EXTENSIONS)))
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            raise FileNotFoundError(f"image {item} does not exist (give image files or folders of them)")
    return paths


def open_predictor(source: str | Path) -> Predictor:
    """A run folder (rebuilt: base + its trained state) or an export folder (loaded as `load_adapter` does)."""
    source = Path(source)
    if (source / MANIFEST).is_file():
        manifest = read_manifest(source)
        templates = manifest.get("templates") or ["a photo of a {label}."]
        return Predictor(load_adapter(source), labels_of(manifest), list(templates))
    if (source / RECIPE_FILE).is_file():
        run = read_run(source)
        labels = run_data(run).labels
        return Predictor(rebuild(run, labels), labels, list(run.recipe.data.templates))
    raise ExportError(f"{source} is neither a run folder (no {RECIPE_FILE}) nor an export folder (no {MANIFEST}); "
                      "give a folder written by `mmpeft run` or `mmpeft export`")


def choose_labels(predictor: Predictor, labels: Sequence[str] | None, source: str | Path) -> LabelSet:
    """The run's label set, or new labels written with the run's templates (zero-shot on them)."""
    if not labels:
        return predictor.labels
    names = [str(name).strip() for name in (labels.split(",") if isinstance(labels, str) else labels)]
    if any(not name for name in names):
        raise ValueError(f"labels: an empty label in {list(labels)!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"labels: duplicates in {names!r}; give each label once")
    if predictor.backbone.head is not None:
        raise ValueError(f"labels: {source} classifies with a trained head over its own {len(predictor.labels)} "
                         f"classes ({', '.join(predictor.labels.names)}), so it cannot score new labels; omit "
                         "labels, or train a method that scores label texts (lora, ia3, prompt, ...)")
    return LabelSet(names, templates=predictor.templates)


def read_image(path: Path):
    try:
        return load_image(path), None
    except Exception as error:  # any unreadable file: PIL raises OSError, ValueError, DecompressionBombError, ...
        return None, f"cannot read image: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


@torch.no_grad()
def predict_batch(backbone: Backbone, paths: list[Path], labels: LabelSet | None, targets, top_k: int,
                  answering: bool) -> list[dict]:
    loaded = [read_image(path) for path in paths]
    rows: list[dict] = [{"path": str(path), "error": error} for path, (_, error) in zip(paths, loaded) if error]
    for row in rows:
        logger.warning("%s: %s (skipped)", row["path"], row["error"])
    good = [(path, image) for path, (image, error) in zip(paths, loaded) if error is None]
    if good:
        images = [image for _, image in good]
        if answering:
            found = answers(backbone, images)
            rows += [{"path": str(path), "answer": answer} for (path, _), answer in zip(good, found)]
        else:
            probabilities = backbone.classify(backbone.preprocess(images), targets).float().softmax(-1).cpu()
            k = min(top_k, len(labels))
            for (path, _), row in zip(good, probabilities):
                scores, order = row.topk(k)
                rows.append({"path": str(path), "labels": [{"label": labels.names[int(i)], "score": float(s)}
                                                           for s, i in zip(scores, order)]})
    position = {str(path): i for i, path in enumerate(paths)}
    return sorted(rows, key=lambda row: position[row["path"]])


def answers(backbone: Backbone, images: list) -> list[str]:
    """Greedy answers to the task's question through the model's chat template."""
    from mmpeft.evaluation.answers import generate_answers

    backbone.require("generative", "answering questions")
    task = backbone.task_settings()
    prompt = backbone.prompt_text(task["question"])
    return generate_answers(backbone, [prompt] * len(images), [[image] for image in backbone.preprocess(images)],
                            task["max_new_tokens"])


@contextmanager
def rows_writer(out: str | Path | None) -> Iterator[Callable[[dict], None]]:
    """JSON lines streamed into a temporary file beside `out`, renamed onto it when the job ends; no-op without."""
    if out is None:
        yield lambda row: None
        return
    with atomic_path(out) as staging, open(staging, "w", encoding="utf-8") as handle:
        def write(row: dict) -> None:
            handle.write(json.dumps(row) + "\n")
            handle.flush()

        yield write


def iter_labels_file(path: str | Path) -> Iterator[str]:
    """One label a line; blank lines and `#` comments skipped."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def table(rows: list[dict], limit: int = TABLE_ROWS) -> str:
    """A short terminal table: each image's top label (score) or answer, or why it was skipped."""
    lines = []
    shown = rows[:limit]
    root = os.path.commonpath([os.path.dirname(os.path.abspath(r["path"])) for r in shown]) if shown else ""
    names = [os.path.relpath(os.path.abspath(r["path"]), root) for r in shown]  # short, yet unique
    width = min(60, max(map(len, names), default=5))
    for row, name in zip(shown, names):
        name = name[-width:].ljust(width)
        if "error" in row:
            lines.append(f"{name}  SKIPPED: {row['error']}")
        elif "answer" in row:
            lines.append(f"{name}  {row['answer']!r}")
        else:
            lines.append(f"{name}  " + ", ".join(f"{e['label']} {e['score']:.3f}" for e in row["labels"][:3]))
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more")
    errors = sum("error" in row for row in rows)
    lines.append(f"{len(rows) - errors} image(s) predicted" + (f", {errors} unreadable and skipped" if errors else ""))
    return "\n".join(lines) + "\n"
