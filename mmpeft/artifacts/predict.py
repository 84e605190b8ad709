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
from mmpeft.artifacts.runs import ExportError, read_run, rebuild, run_labels
from mmpeft.backbones import Backbone
from mmpeft.core.io import atomic_path
from mmpeft.data import LabelSet, load_image
from mmpeft.data.sources import IMAGE_EXTENSIONS
from mmpeft.runs.folder import RECIPE_FILE
from mmpeft.specs import DataSpec

logger = logging.getLogger("mmpeft")

DEFAULT_BATCH_SIZE = 16
MAX_PIXELS = DataSpec.max_image_pixels  # the recipe default, for images given to predict
TABLE_ROWS = 20  # rows shown on the terminal; the JSON lines hold all of them


@dataclass
class Predictor:
    """A loaded model with the label set it was trained for and the templates that write new labels' texts."""

    backbone: Backbone
    labels: LabelSet
    templates: list[str]


def predict(source: str | Path, images: str | Path | Sequence[str | Path], labels: Sequence[str] | None = None,
            top_k: int = 5, question: str | None = None, out: str | Path | None = None,
            batch_size: int = DEFAULT_BATCH_SIZE, base: str | None = None) -> list[dict]:
    """Rows `{"path", "labels": [{"label", "score"}, ...]}` (top_k, scores are probabilities over the labels),
    `{"path", "answer"}` (generative, no labels) or `{"path", "error"}` (an unreadable image), in input order;
    with `out`, also written as JSON lines (complete or absent). Folders are walked recursively. `base`: an export's
    base model (hub id or folder) when the one recorded in it moved, as in `load_adapter`."""
    check_count("top_k", top_k)
    check_count("batch_size", batch_size)
    if question is not None and not str(question).strip():
        raise ValueError("question: empty; give the question to ask, or leave it out for the run's own")
    labels = label_names(labels)  # checked before any model loads
    paths = image_paths(images)
    check_out(out, paths)
    with rows_writer(out) as write:  # opened first: a destination that cannot be written fails before any model loads
        return predict_into(write, open_predictor(source, base), source, paths, labels, top_k, question, batch_size)


def predict_into(write: Callable[[dict], None], predictor: Predictor, source: str | Path, paths: list[Path],
                 labels: Sequence[str] | None, top_k: int, question: str | None, batch_size: int) -> list[dict]:
    backbone = predictor.backbone
    answering = backbone.family == "generative" and labels is None
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


def check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: {value!r} is not a whole number; give an int >= 1")
    if value < 1:
        raise ValueError(f"{name}: {value} must be >= 1")


def check_out(out: str | Path | None, paths: list[Path]) -> None:
    """`out` must be a file path that is not one of the images (it would be replaced by the JSON lines)."""
    if out is None:
        return
    target = Path(out)
    if target.is_dir():
        raise ValueError(f"out: {out} is a folder; give a file path, e.g. {target / 'predictions.jsonl'}")
    above = next(folder for folder in target.absolute().parents if folder.exists())
    if not above.is_dir():
        raise ValueError(f"out: {above} is a file, so {out} cannot be written inside it; give another path")
    if target.exists() and any(target.samefile(path) for path in paths if path.exists()):
        raise ValueError(f"out: {out} is one of the images to predict, which the predictions would replace; "
                         "give another file, e.g. predictions.jsonl")


def image_paths(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files as given; folders walked (sorted; hidden files and folders and non-image extensions skipped)."""
    try:
        given = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    except TypeError:
        raise TypeError(f"images: {type(images).__name__} is not a path or a list of paths; give image files or "
                        "folders (str or Path)") from None
    if not given:
        raise ValueError("images: give at least one image file or folder")
    for item in given:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"images: {item!r} is not a path; give image files or folders (str or Path)")
        if not str(item).strip():
            raise ValueError("images: an empty path; give image files or folders")
    paths: list[Path] = []
    for item in map(Path, given):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))  # .thumbnails/
            if not found:
                logger.warning("%s: no image files (%s) in this folder", item, ", ".join(sorted(IMAGE_EXTENSIONS)))
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            raise FileNotFoundError(f"image {item} does not exist (give image files or folders of them)")
    if not paths:  # nothing to predict is a mistake in what was given, not an empty success
        raise ValueError(f"images: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in "
                         f"{', '.join(map(str, given))}; give image files or folders that hold some")
    return paths


def open_predictor(source: str | Path, base: str | None = None) -> Predictor:
    """A run folder (rebuilt: base + its trained state) or an export folder (loaded as `load_adapter` does)."""
    source = Path(source)
    if (source / MANIFEST).is_file():
        manifest = read_manifest(source)
        templates = manifest.get("templates") or ["a photo of a {label}."]
        return Predictor(load_adapter(source, base=base), labels_of(manifest), list(templates))
    if (source / RECIPE_FILE).is_file():
        if base is not None:
            raise ExportError(f"base: {source} is a run folder, which loads the base its recipe names "
                              "(backbone.id); --base is for export folders")
        run = read_run(source, untrained=True)  # a zero-shot run predicts with its base
        labels = run_labels(run)
        return Predictor(rebuild(run, labels), labels, list(run.recipe.data.templates))
    if not source.exists():
        raise ExportError(f"{source} does not exist; give a run folder (written by `mmpeft run`) or an export folder "
                          "(written by `mmpeft export`)")
    cells = sorted(p.name for p in (source / "cells").glob("*") if (p / RECIPE_FILE).is_file())
    if cells:  # a compare / fewshot / search grid: each of its cells is a run folder
        raise ExportError(f"{source} is a grid folder; predict with one of its cells, e.g. "
                          f"{source / 'cells' / cells[0]} ({len(cells)} cells: {', '.join(cells[:4])}"
                          f"{', ...' if len(cells) > 4 else ''})")
    raise ExportError(f"{source} is neither a run folder (no {RECIPE_FILE}) nor an export folder (no {MANIFEST}); "
                      "give a folder written by `mmpeft run` or `mmpeft export`")


def label_names(labels: str | Sequence[str] | None) -> list[str] | None:
    """Labels given ("a,b" or a list) as names, each once and at least two; None: the run's own."""
    if labels is None:
        return None
    names = [str(name).strip() for name in (labels.split(",") if isinstance(labels, str) else labels)]
    if not names or names == [""]:
        raise ValueError("labels: none given; give at least two labels, or leave labels out to score the run's own "
                         "classes")
    if any(not name for name in names):
        raise ValueError(f"labels: an empty label in {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"labels: duplicates in {names!r}; give each label once")
    if len(names) == 1:
        raise ValueError(f"labels: only one label ({names[0]!r}); scores are probabilities over the labels given, so "
                         "one label always scores 1.0: give at least two")
    return names


def choose_labels(predictor: Predictor, names: list[str] | None, source: str | Path) -> LabelSet:
    """The run's label set, or new labels written with the run's templates (zero-shot on them)."""
    if names is None and not len(predictor.labels):
        raise ValueError(f"labels: {source} was trained on caption-only data, which has no classes to score; give "
                         "the labels to score (--labels a,b,c or --labels-file F; Python: labels=[...])")
    if names is None:
        return predictor.labels
    if predictor.backbone.head is not None:
        raise ValueError(f"labels: {source} classifies with a trained head over its own {len(predictor.labels)} "
                         f"classes ({', '.join(predictor.labels.names)}), so it cannot score new labels; omit "
                         "labels, or train a method that scores label texts (lora, ia3, prompt, ...)")
    return LabelSet(names, templates=predictor.templates)


def read_image(path: Path):
    """(the image, None) or (None, why it is skipped). Its size is read from the header first: a PNG of a hundred
    bytes can claim 12000x12000 pixels (half a gigabyte decoded); past data.max_image_pixels' default it is skipped."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            width, height = opened.size
        if width * height > MAX_PIXELS:
            return None, (f"image too large: {width}x{height} = {width * height:,} pixels, over {MAX_PIXELS:,} "
                          "(data.max_image_pixels' default); downscale it")
        return load_image(str(path)), None
    except Exception as error:  # any unreadable file: PIL raises OSError, ValueError, DecompressionBombError, ...
        cause = error.__cause__ or error  # load_image's DataError wraps PIL's own
        text = str(cause).splitlines()[0] if str(cause) else ""
        return None, f"cannot read image: {type(cause).__name__}: {text}"


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
    """One label a line (UTF-8, a byte-order mark allowed); blank lines and `#` comments skipped; refuses a missing,
    unreadable or label-less file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"labels file {path} " + ("is a folder" if path.is_dir() else "does not exist")
                         + "; give a text file with one label a line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"labels file {path} is not UTF-8 (byte {error.object[error.start]:#04x} at offset "
                         f"{error.start}); save it as UTF-8") from None
    labels = [line.strip() for line in text.splitlines()]
    labels = [line for line in labels if line and not line.startswith("#")]
    if not labels:
        raise ValueError(f"labels file {path} holds no labels (one label a line; blank lines and # comments are "
                         "skipped)")
    yield from labels


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
