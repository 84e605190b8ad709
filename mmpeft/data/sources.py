"""Raw rows from every `data.source`: image references (paths stay paths), raw label strings, optional captions.

Nothing here judges a row beyond what only the reader can see (a path escaping its root, a line that is not
JSON): such rows carry a `problem` and `validate` reports them with the rest, so all bad rows surface at once.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmpeft.core.schema import did_you_mean
from mmpeft.data.errors import DataError
from mmpeft.data.images import to_rgb
from mmpeft.specs import DataSpec

URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)  # an image column of URLs (img2dataset's input)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


@dataclass(frozen=True, eq=False)
class DatasetImage:
    """An image stored inside a `datasets` table, decoded only when used so a large dataset stays on disk."""

    dataset: Any  # a datasets.Dataset holding only the image column, cast to Image(decode=False)
    column: str
    index: int

    def open(self) -> Image.Image:
        value = self.dataset[self.index][self.column]
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        return Image.open(value["path"])

    def __repr__(self) -> str:
        return f"DatasetImage(row {self.index}, column {self.column!r})"


@dataclass(frozen=True, eq=False)
class ShardImage:
    """An image member of a WebDataset tar shard, read in place (seek + read) only when used."""

    shard: str
    member: str
    offset: int  # of the member's data in the tar file
    size: int

    def open(self) -> Image.Image:
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            return Image.open(io.BytesIO(handle.read(self.size)))

    def __repr__(self) -> str:
        return f"ShardImage({self.shard}:{self.member})"


ImageRef = str | Image.Image | DatasetImage | ShardImage


@dataclass(frozen=True)
class Row:
    """One raw row; `source` names where it came from ("line 4", "cat/001.png", "row 12") for messages."""

    image: ImageRef
    label: str | None
    text: str | None
    source: str
    problem: str | None = None  # set by the reader when the row is unusable as read (e.g. path escapes root)
    prompt: str | None = None  # the row's own question for generative backbones (data.prompt_column)


@dataclass
class RawData:
    """The rows of one source, where they came from (for messages), and the source's own label names."""

    rows: list[Row]
    where: str
    label_names: dict[str, str] = field(default_factory=dict)
    labelled: bool = True  # False: caption-only rows (no label column), for contrastive training and retrieval
    held_out: list[Row] | None = None  # rows of data.eval_path: the test split, instead of a random one


def read_rows(spec: DataSpec) -> RawData:
    """Dispatch on `spec.source`; every reader returns rows in a deterministic order."""
    if spec.source == "digits":
        from mmpeft.data.digits import DIGIT_NAMES, prepare_digits

        folder = prepare_digits()
        return RawData(read_folder(folder), str(folder), dict(DIGIT_NAMES))
    path = str(spec.path)
    if spec.source == "folder":
        return RawData(read_folder(Path(path)), path)
    if spec.source in ("csv", "jsonl"):
        reader = read_csv if spec.source == "csv" else read_jsonl
        return RawData(reader(Path(path), spec), path)
    if spec.source in ("hf", "hf_disk"):
        return RawData(read_hf(spec), path)
    raise DataError(f"data.source: unknown source {spec.source!r}")


def read_folder(root: Path) -> list[Row]:
    """One sub-folder per class (nested folders allowed); non-image and hidden files are ignored."""
    if not root.is_dir():
        raise DataError(f"data.path: image folder {str(root)!r} does not exist")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders found; a folder source needs one sub-folder per class "
                        "(for example cat/001.png, dog/002.png)")
    rows = []
    for label in classes:
        for dirpath, dirnames, filenames in os.walk(root / label):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                path = os.path.join(dirpath, name)
                rows.append(Row(path, label, None, os.path.relpath(path, root)))
    return rows


def read_csv(path: Path, spec: DataSpec) -> list[Row]:
    """CSV with a header row; `source` is the physical line number so users can find the row in an editor."""
    root = _image_root(path, spec)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=spec.separator or ",")
        try:
            _require_columns(path, list(reader.fieldnames or []), spec)
            rows = []
            for record in reader:
                rows.append(_make_row(record, f"line {reader.line_num}", root, spec))
        except UnicodeDecodeError as error:
            raise _not_utf8(path, error) from None
    return rows


def read_jsonl(path: Path, spec: DataSpec) -> list[Row]:
    """One JSON object per line; blank lines are skipped, a line that is not an object is a bad row.

    A UTF-8 byte-order mark is accepted (as for CSV): editors on Windows write one.
    """
    root = _image_root(path, spec)
    try:
        return _jsonl_rows(path, root, spec)
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None


def _jsonl_rows(path: Path, root: str, spec: DataSpec) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                rows.append(Row("", None, None, source, f"not valid JSON ({error.msg})"))
                continue
            if not isinstance(record, dict):
                rows.append(Row("", None, None, source, f"expected a JSON object, got {type(record).__name__}"))
                continue
            missing = [c for c in (spec.image_column, spec.label_column) if c not in record]
            if missing:
                keys = ", ".join(map(repr, missing))
                rows.append(Row("", None, None, source, f"no {keys} key (keys: {', '.join(record)})"))
                continue
            rows.append(_make_row(record, source, root, spec))
    return rows


def read_hf(spec: DataSpec) -> list[Row]:
    """A `datasets` table: `hf` loads a builder/name (a local directory means imagefolder), `hf_disk` a saved one."""
    import datasets

    path = str(spec.path)
    if spec.source == "hf_disk":
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if spec.hf_split not in loaded:
                raise DataError(f"data.hf_split: {path} has no split {spec.hf_split!r}"
                                f"{did_you_mean(spec.hf_split, list(loaded))}; splits: {', '.join(loaded)}")
            loaded = loaded[spec.hf_split]
    else:
        local = Path(path).is_dir()
        try:
            if local:
                loaded = datasets.load_dataset("imagefolder", data_dir=path, split=spec.hf_split)
            else:
                loaded = datasets.load_dataset(path, split=spec.hf_split)
        except Exception as error:  # datasets raises many types (hub, split, builder); all mean "cannot load"
            hint = "" if local else (" (offline? use a local directory, a dataset saved with save_to_disk "
                                     "and data.source: hf_disk, or a name already in the datasets cache)")
            raise DataError(f"data.path: cannot load {path!r} split {spec.hf_split!r} with datasets: "
                            f"{type(error).__name__}: {error}{hint}") from error
    return rows_from_dataset(loaded, spec, path)


def rows_from_dataset(table: Any, spec: DataSpec, where: str) -> list[Row]:
    """Rows from a `datasets.Dataset`: ClassLabel ints become their names; image bytes stay in the table."""
    import datasets

    _require_columns(Path(where), list(table.column_names), spec)
    label_feature = table.features[spec.label_column]
    names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    labels = _column(table, spec.label_column)
    texts = _column(table, spec.text_column) if spec.text_column in table.column_names else [None] * len(table)
    prompts = _column(table, spec.prompt_column) if spec.prompt_column in table.column_names else [None] * len(table)
    images = table.select_columns([spec.image_column])
    is_image = isinstance(table.features[spec.image_column], datasets.Image)
    if is_image:
        images = images.cast_column(spec.image_column, datasets.Image(decode=False))
    root = os.path.abspath(spec.image_root) if spec.image_root else None
    rows: list[Row] = []
    for start in range(0, len(table), 1000):
        batch = images[start:start + 1000][spec.image_column]
        for offset, value in enumerate(batch):
            index = start + offset
            label = _label_text(labels[index], names)
            text = str(texts[index]) if texts[index] not in (None, "") else None
            prompt = str(prompts[index]) if prompts[index] not in (None, "") else None
            source = f"row {index}"
            if not is_image:
                rows.append(_make_row({spec.image_column: value, spec.label_column: label,
                                       spec.text_column: text, spec.prompt_column: prompt}, source, root, spec))
            elif not value.get("bytes") and value.get("path") and os.path.isfile(value["path"]):
                rows.append(Row(value["path"], label, text, source, prompt=prompt))
            else:
                rows.append(Row(DatasetImage(images, spec.image_column, index), label, text, source, prompt=prompt))
    return rows


def load_image(ref: ImageRef) -> Image.Image:
    """Any image reference -> a fully loaded 8-bit RGB image (`images.to_rgb`: every PIL mode scaled properly).

    A file that fails to decode here passed the bad-row checks, so it was damaged or replaced since: the DataError
    names it, rather than letting a bare PIL error stop an epoch without saying which file.
    """
    try:
        if isinstance(ref, Image.Image):
            return to_rgb(ref)  # the caller's image: not ours to close
        image = ref.open() if isinstance(ref, (DatasetImage, ShardImage)) else Image.open(ref)
        with image:
            return to_rgb(image)
    except Exception as error:  # PIL raises many types for damaged files (OSError, SyntaxError, ValueError, ...)
        raise DataError(f"cannot read image {describe_image(ref)}: {type(error).__name__}: {error}. Replace or "
                        "remove the file (it was damaged or changed after the data was checked)") from error


def describe_image(ref: ImageRef) -> str:
    """How messages name an image reference: the path, the `datasets` row, or an in-memory image."""
    if isinstance(ref, (str, DatasetImage)):
        return repr(ref)
    return f"in memory ({ref.mode} {ref.size[0]}x{ref.size[1]})"


def _label_text(value: Any, names: list[str] | None) -> str | None:
    if value is None or (names is not None and value == -1):  # -1: ClassLabel's "no label"
        return None
    return names[value] if names is not None else str(value)


def _image_root(path: Path, spec: DataSpec) -> str:
    if not path.is_file():
        raise DataError(f"data.path: {spec.source} file {str(path)!r} does not exist")
    return os.path.abspath(spec.image_root or path.parent)


def _not_utf8(path: Path, error: UnicodeDecodeError) -> DataError:
    """The first line that is not UTF-8, with its bad byte and the text around it read as latin-1."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                near = line[max(0, bad.start - 15):bad.start + 15].decode("latin-1").strip()
                return DataError(f"{path}: line {number} is not UTF-8 text (byte 0x{line[bad.start]:02x} at column "
                                 f"{bad.start + 1}, near {near!r}): the file uses another encoding (latin-1 or "
                                 "cp1252, as older spreadsheet exports do). Save it as UTF-8 and run again")
    return DataError(f"{path}: not UTF-8 text ({error.reason}). Save it as UTF-8 and run again")


def duplicated_columns(path: Path, columns: list[str], used: list[str]) -> None:
    """A header naming a column that is read twice: the reader would silently keep the last one."""
    twice = [name for name in dict.fromkeys(used) if columns.count(name) > 1]
    if twice:
        raise DataError(f"{path}: the header names column {twice[0]!r} {columns.count(twice[0])} times (columns: "
                        f"{', '.join(columns)}), so which one to read is ambiguous; rename all but one")


def _require_columns(path: Path, columns: list[str], spec: DataSpec) -> None:
    duplicated_columns(path, columns, [spec.image_column, spec.label_column, spec.text_column, spec.prompt_column])
    problems = []
    for key, column in (("image_column", spec.image_column), ("label_column", spec.label_column)):
        if column not in columns:
            problems.append(f"data.{key}: no column {column!r} in {path}{did_you_mean(column, columns)}")
    if problems:
        raise DataError("; ".join(problems) + f" (columns: {', '.join(columns) or 'none'})")


def _column(table: Any, name: str) -> list:
    """A whole column as a list (one arrow read; indexing a `datasets` Column row by row is ~50x slower)."""
    return table.select_columns([name])[:][name]


def _make_row(record: dict, source: str, root: str | None, spec: DataSpec) -> Row:
    """Resolve the image path inside `root`; a path that leaves it, as written or through a symbolic link (checked on
    the resolved path, so a link to /etc/passwd is not read), is a bad row, never read.

    `root` is None only for path columns of a `datasets` table without data.image_root: paths are taken as given.
    """
    label = record.get(spec.label_column)
    label = None if label is None or str(label).strip() == "" else str(label).strip()
    text = record.get(spec.text_column)
    text = None if text is None or str(text).strip() == "" else str(text)
    prompt = record.get(spec.prompt_column)
    prompt = None if prompt is None or str(prompt).strip() == "" else str(prompt)
    value = record.get(spec.image_column)
    if value is None or str(value).strip() == "":
        return Row("", label, text, source, f"empty image column {spec.image_column!r}")
    value = str(value).strip()
    if URL.match(value):
        return Row("", label, text, source, f"image {value!r:.80} is a URL; image paths name local files: download "
                                            "the images first (img2dataset writes them as files or shards)")
    if root is None:
        return Row(os.path.abspath(value), label, text, source, prompt=prompt)
    resolved, problem = image_under(root, value)
    return Row(resolved, label, text, source, problem, prompt=prompt)


def image_under(root: str, value: str) -> tuple[str, str | None]:
    """`value` resolved under the image root, and why it may not be read (None: it may): a path that escapes the
    root, or a symbolic link (to the file, or a folder on the way) that leads outside it."""
    resolved = os.path.abspath(os.path.join(root, value))
    if os.path.commonpath([resolved, root]) != root:
        return resolved, f"image path {value!r} escapes the image root {root}"
    real, real_root = os.path.realpath(resolved), os.path.realpath(root)  # where the bytes really are
    if os.path.commonpath([real, real_root]) != real_root:
        return resolved, f"image path {value!r} leads through a symbolic link to {real}, outside the image root {root}"
    return resolved, None
