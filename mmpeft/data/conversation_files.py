"""Reading conversation rows from where their tools put them: a JSON list, JSON Lines, or a `datasets` table.

Image paths resolve inside `data.image_root` (default: the data file's folder); a path that leaves it is a bad
row and is never opened. A `datasets` Image column (or a list of them) stays in the table until an image is used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmpeft.data.conversations import Conversation, ConversationFormat, DatasetImageAt, parse_record
from mmpeft.data.errors import DataError
from mmpeft.data.sources import ImageRef, _not_utf8, image_under

Parse = Callable[[Any, str, list[ImageRef]], Conversation]


def read_records(path: Path, hf_split: str = "train") -> list[tuple[str, Any]]:
    """[(source, record)] in file order; a saved `datasets` table's image columns stay in the table.

    A `.json` file may hold a list (LLaVA, LLaMA-Factory) or one object per line (JSON Lines, any extension).
    """
    if path.is_dir():
        return _dataset_records(path, hf_split)
    if not path.is_file():
        raise DataError(f"data.path: conversation file {str(path)!r} does not exist")
    text = read_text(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):
            raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") \
                from None
        whole = None  # JSON Lines: one object per line
    if isinstance(whole, list):
        return [(f"row {i}", record) for i, record in enumerate(whole)]
    if whole is not None and "\n" in text.strip():
        raise DataError(f"{path}: one JSON {type(whole).__name__}, not a list of rows or one object per line")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            rows.append((f"line {number}", _NotJson(error.msg)))
    return rows


def read_text(path: Path) -> str:
    """A UTF-8 text file (a byte-order mark allowed); any other encoding is a DataError naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None


@dataclasses.dataclass(frozen=True)
class _NotJson:
    message: str


def _dataset_records(path: Path, hf_split: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(f"data.path: {path} is a folder but not a dataset saved with save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if hf_split not in loaded:
            raise DataError(f"data.hf_split: {path} has no split {hf_split!r}; splits: {', '.join(loaded)}")
        loaded = loaded[hf_split]
    image_columns = [name for name, feature in loaded.features.items() if _holds_images(feature)]
    text_view = loaded.remove_columns(image_columns)
    records = [(f"row {i}", record) for i, record in enumerate(text_view)]
    for name in image_columns:
        for (_, record), count in zip(records, _image_counts(loaded, name)):
            record[name] = count
    return records


def _holds_images(feature: Any) -> bool:
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    inner = getattr(feature, "feature", None)
    if isinstance(feature, list) and feature:
        inner = feature[0]
    return isinstance(inner, datasets.Image)


def _image_counts(table: Any, column: str) -> list[_StoredImages]:
    """How many images each row stores in `column`, read without decoding a single image."""
    import datasets

    feature = table.features[column]
    undecoded = datasets.Image(decode=False)
    view = table.select_columns([column])
    if isinstance(feature, datasets.Image):  # one image a row, or none (a text-only row keeps None there)
        view = view.cast_column(column, undecoded)
        present = [valid for batch in view.with_format("arrow").iter(batch_size=10_000)
                   for valid in batch.column(column).is_valid().to_pylist()]
        return [_StoredImages(view, column, i, None if has else 0) for i, has in enumerate(present)]
    view = view.cast_column(column, datasets.List(undecoded))
    lengths = [len(value or ()) for value in view[:][column]]
    return [_StoredImages(view, column, i, n) for i, n in enumerate(lengths)]


@dataclasses.dataclass(frozen=True)
class _StoredImages:
    """The images of one row of a `datasets` table: one (count None) or a list of `count` (0: none)."""

    table: Any
    column: str
    index: int
    count: int | None

    def refs(self) -> list[ImageRef]:
        from mmpeft.data.sources import DatasetImage

        if self.count is None:
            return [DatasetImage(self.table, self.column, self.index)]
        return [DatasetImageAt(self.table, self.column, self.index, p) for p in range(self.count)]


def read_conversations(path: Path, fmt: ConversationFormat, image_root: str | None, hf_split: str = "train",
                       parse: Parse | None = None) -> list[Conversation]:
    """Every row of the file as a Conversation (bad ones carry their problems, for `find_bad_conversations`).

    `parse` reads one record (default: `parse_record` with `fmt`); `fmt.images_key` names the images column.
    """
    records = read_records(path, hf_split)
    root = os.path.abspath(image_root or (path if path.is_dir() else path.parent))
    key = fmt.images_key
    conversations = []
    for source, record in records:
        if isinstance(record, _NotJson):
            conversations.append(Conversation((), (), source, (f"not valid JSON ({record.message})",)))
            continue
        images, problems = row_images(record.get(key) if isinstance(record, dict) and key else None, root, key)
        conversation = parse(record, source, images) if parse else parse_record(record, source, fmt, images)
        if problems:
            conversation = dataclasses.replace(conversation, problems=tuple(problems) + conversation.problems)
        conversations.append(conversation)
    return conversations


def row_images(value: Any, root: str, key: str | None) -> tuple[list[ImageRef], list[str]]:
    """A row's image value (a path, a list of paths, stored images) -> references, and what is wrong with them."""
    if value is None:
        return [], []
    if isinstance(value, _StoredImages):
        return value.refs(), []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list):
        return [], [f"{key!r}: expected an image path or a list of paths, got {type(value).__name__}"]
    refs, problems = [], []
    for i, item in enumerate(paths):
        if isinstance(item, dict) and isinstance(item.get("path"), str):  # a datasets Image dict written to JSON
            item = item["path"]
        if not isinstance(item, str) or not item.strip():
            problems.append(f"{key!r}[{i}]: expected an image path, got {item!r:.60}")
            continue
        resolved, problem = image_under(root, item.strip())
        if problem is not None:
            problems.append(f"{key!r}[{i}]: {problem}; set data.image_root to a folder that holds the images")
            continue
        refs.append(resolved)
    return refs, problems
