"""Caption data for contrastive training: open_clip's caption tables and WebDataset shards, a label optional.

Why these two layouts: they are what image-text data already comes in. open_clip trains from a CSV/TSV with a
`filepath` and a `title` column (tab-separated by default) and from WebDataset tar shards; a dataset prepared for
either trains here unchanged. Rows carry no class unless the table has `data.label_column`: without one the data is
caption-only (`RawData.labelled` False), which trains with `train.objective: contrastive` and is evaluated by
retrieval only. `data.eval_path` names a held-out table or shard pattern that becomes the test split.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from mmpeft.data.errors import DataError
from mmpeft.data.shards import check_held_out_apart, expand_shards, read_shards
from mmpeft.data.sources import RawData, Row, _image_root, _make_row, _not_utf8, duplicated_columns
from mmpeft.specs import DataSpec

# open_clip's own column names (--csv-img-key filepath --csv-caption-key title), used when the recipe leaves
# data.image_column / data.text_column at mmpeft's defaults and the table has open_clip's columns instead.
OPEN_CLIP_COLUMNS = {"image_column": "filepath", "text_column": "title"}


def read_caption_source(spec: DataSpec) -> RawData:
    """Rows of `data.path` and, with `data.eval_path`, the held-out rows; labelled only if every part has labels."""
    read = read_caption_table if spec.source == "captions" else _read_shards
    if spec.eval_path is not None:
        check_held_out_apart(spec, lambda pattern: [pattern] if spec.source == "captions" else expand_shards(pattern))
    rows, labelled = read(str(spec.path), spec)
    held_out = None
    if spec.eval_path is not None:
        held_out, held_out_labelled = read(spec.eval_path, spec)
        if spec.source == "captions":  # name the file in bad-row messages ("line 4" alone would mean data.path)
            held_out = [dataclasses.replace(row, source=f"{spec.eval_path} {row.source}") for row in held_out]
        if held_out_labelled != labelled:
            raise DataError(f"data.eval_path {spec.eval_path!r} {'has' if held_out_labelled else 'lacks'} the label "
                            f"column {spec.label_column!r} but data.path {spec.path!r} "
                            f"{'has' if labelled else 'does not'}: give both labels, or neither")
    return RawData(rows, str(spec.path), labelled=labelled, held_out=held_out)


def read_caption_table(path: str, spec: DataSpec) -> tuple[list[Row], bool]:
    """An open_clip CSV/TSV (`data.separator`, tab by default): an image path and a caption per row; a row without
    a caption is a bad row unless it has a label. Returns the rows and whether the table has a label column."""
    file = Path(path)
    root = _image_root(file, spec)
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=spec.separator or "\t")
            columns = list(reader.fieldnames or [])
            spec = table_columns(file, columns, spec)
            labelled = spec.label_column in columns
            rows = []
            for record in reader:
                row = _make_row(record, f"line {reader.line_num}", root, spec)
                if row.text is None and row.problem is None and row.label is None:
                    row = dataclasses.replace(row, problem=f"empty caption column {spec.text_column!r}")
                rows.append(row)
    except UnicodeDecodeError as error:
        raise _not_utf8(file, error) from None
    return rows, labelled


def table_columns(file: Path, columns: list[str], spec: DataSpec) -> DataSpec:
    """The spec with the image and caption columns this table really has; a clear error naming what is missing."""
    if len(columns) <= 1 and spec.separator is None:
        raise DataError(f"data.path: {file} has a single column {columns[0] if columns else ''!r} with the default "
                        "tab separator; for a comma-separated file set data.separator: ','")
    if len(columns) <= 1:
        raise DataError(f"data.separator: {file} has a single column {columns[0] if columns else ''!r} with "
                        f"data.separator {spec.separator!r}; set data.separator to the character between its columns")
    defaults = DataSpec.__dataclass_fields__
    chosen = {}
    for key, open_clip in OPEN_CLIP_COLUMNS.items():
        name = getattr(spec, key)
        if name not in columns and name == defaults[key].default and open_clip in columns:
            name = open_clip
        if name not in columns:
            raise DataError(f"data.{key}: no column {name!r} in {file} (columns: {', '.join(columns)}); open_clip "
                            f"tables name it {open_clip!r}")
        chosen[key] = name
    duplicated_columns(file, columns, [*chosen.values(), spec.label_column])
    return dataclasses.replace(spec, **chosen)


def _read_shards(pattern: str, spec: DataSpec) -> tuple[list[Row], bool]:
    return read_shards(pattern, spec)
