"""Data: raw rows -> label set -> bad-row checks -> stratified splits -> k-shot, as one call (`load_data`).

Images stay references (paths, or rows of a `datasets` table) until an `ImageDataset` item is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmpeft.data import sources, stream
from mmpeft.data.augment import check_augment
from mmpeft.data.captions import read_caption_source
from mmpeft.data.conversation_data import CONVERSATION_SOURCES
from mmpeft.data.dataset import Example, ImageCollator, ImageDataset, collate_images
from mmpeft.data.errors import DataError
from mmpeft.data.labels import LabelSet
from mmpeft.data.shards import check_held_out_apart
from mmpeft.data.shifts import SHIFTS, apply_shifts, parse_shift, shift_label
from mmpeft.data.sources import DatasetImage, Row, load_image
from mmpeft.data.splits import examples_fingerprint, k_shot, split_examples
from mmpeft.data.stream import StreamCount, StreamSource
from mmpeft.data.stream_dataset import StreamDataset
from mmpeft.data.validate import check_empty_classes, find_bad_rows, report_bad_rows
from mmpeft.specs import DataSpec, SplitSpec

__all__ = [
    "SHIFTS", "DataError", "DataSplits", "DatasetImage", "Example", "ImageCollator", "ImageDataset", "LabelSet",
    "Row", "apply_shifts", "collate_images", "examples_fingerprint", "k_shot", "load_data", "load_image",
    "parse_shift", "shift_label", "split_examples",
]

MAX_LISTED_SKIPS = 100  # bad rows quoted in `info` (the count is always exact)


@dataclass
class DataSplits:
    """The examples of each split, the label set, the parsed `data.shift`, and facts for the run's report."""

    train: list[Example]
    val: list[Example]
    test: list[Example]
    labels: LabelSet
    info: dict[str, Any] = field(default_factory=dict)
    shifts: tuple[str, ...] = ()  # `data.shift` parsed: pass to every ImageDataset
    stream: StreamSource | None = None  # data.stream: the training split is this stream (`train` stays empty)

    def dataset(self, split: str, augment: bool = False, seed: int = 0, spec: DataSpec | None = None,
                ) -> ImageDataset | StreamDataset:
        """An ImageDataset of one split with `shifts` applied (and `spec.augment` when `augment` is true); a
        streamed training split is a StreamDataset."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if split == "train" and self.stream is not None:
            return StreamDataset(self.stream, self.shifts, spec.augment if augment and spec else None, seed)
        return ImageDataset(getattr(self, split), self.shifts, spec.augment if augment and spec else None, seed)


def read_rows(spec: DataSpec) -> sources.RawData:
    """The raw rows of any `data.source` (caption tables and shards: mmpeft.data.captions)."""
    if spec.source in ("captions", "webdataset"):
        return read_caption_source(spec)
    return sources.read_rows(spec)


def load_data(spec: DataSpec, seed: int) -> DataSplits:
    """Read, check, split and sample the data of a recipe; raises DataError with what to fix."""
    shifts = parse_shift(spec.shift)  # fail fast on typos, before any file is read
    for shift in spec.eval_shifts:
        parse_shift(shift)
    check_augment(spec.augment)
    if spec.source in CONVERSATION_SOURCES:
        raise DataError(f"data.source: {spec.source} holds conversations, not labelled images; so far only "
                        "`mmpeft run`, `check`, `plan` and `predict` read them (grids, continual sequences and export "
                        "need labelled data)")
    if spec.stream:
        return _load_stream(spec, seed, shifts)
    raw = read_rows(spec)
    if not raw.rows:
        raise DataError(f"no rows found in {raw.where} (data.source: {spec.source})")
    if not raw.labelled and (spec.shots is not None or spec.classes is not None):
        raise DataError(f"data.{'shots' if spec.shots is not None else 'classes'}: {raw.where} has no label column "
                        f"{spec.label_column!r} (caption-only data), so there are no classes to sample or list")
    good, bad = find_bad_rows(raw.rows + (raw.held_out or []), spec.classes, spec.max_image_pixels, raw.labelled)
    report_bad_rows(bad, raw.where, spec.on_bad_rows)
    if not good:
        raise DataError(f"no usable rows in {raw.where}: all {len(bad)} rows are bad")
    captioned = all(row.text for row in good)  # caption/answer data may carry a single placeholder label
    labels = LabelSet.from_spec(spec, [row.label for row in good if row.label is not None], raw.label_names,
                                where=raw.where, min_classes=0 if not raw.labelled else 1 if captioned else 2)
    check_empty_classes(labels.keys, (row.label for row in good), raw.where, len(bad))
    # caption-only rows get class -1: no class, never a positive of another row (mmpeft.objectives.contrastive)
    examples = [Example(row.image, labels.index(row.label) if raw.labelled else -1, row.text, row.prompt)
                for row in good]
    if raw.held_out is None:
        train, val, test = _split(examples, spec, seed, labels.names)
    else:
        held_out = {id(row) for row in raw.held_out}
        train, val, test = _split_held_out(examples, [id(row) in held_out for row in good], spec, seed, labels.names)
    if spec.shots is not None:
        train = k_shot(train, spec.shots, seed, labels.names)
    info = {
        "source": spec.source,
        "where": raw.where,
        "labelled": raw.labelled,
        "classes": len(labels),
        "counts": {"train": len(train), "val": len(val), "test": len(test)},
        "class_counts": {name: _per_class(split, len(labels)) for name, split in
                         (("train", train), ("val", val), ("test", test))},
        "shots": spec.shots,
        "subset": spec.subset,
        "seed": seed,
        "split_seed": spec.split.seed if spec.split.seed is not None else seed,
        "fingerprints": {"train": examples_fingerprint(train), "val": examples_fingerprint(val),
                         "test": examples_fingerprint(test)},
        "shifts": list(shifts),
        "skipped": len(bad),
        "skipped_rows": [str(b) for b in bad[:MAX_LISTED_SKIPS]],
    }
    return DataSplits(train, val, test, labels, info, shifts)


def _load_stream(spec: DataSpec, seed: int, shifts: tuple[str, ...]) -> DataSplits:
    """`data.stream`: the training split stays a stream (shards read in order, never indexed); val and test are the
    held-out patterns `data.val_path` and `data.eval_path`, read in order and checked like any rows. The shards
    are labelled when the counting pass finds labels in them (or, with data.samples_per_epoch, when the held-out
    shards carry labels); the label set is data.classes, else every label found, naturally sorted."""
    urls = stream.shard_urls(str(spec.path))
    check_held_out_apart(spec, stream.shard_urls)
    count = stream.count_samples(urls, spec) if spec.samples_per_epoch is None else None
    parts = {"test": stream.held_out_rows(str(spec.eval_path), spec)}
    if spec.val_path is not None:
        parts["val"] = stream.held_out_rows(spec.val_path, spec)
    rows = [row for split in parts.values() for row in split]
    labelled = bool(count.labels) if count is not None else any(row.label is not None for row in rows)
    where = " + ".join(p for p in (spec.eval_path, spec.val_path) if p)
    labels, origin = _stream_labels(spec, count, rows, labelled, where)
    source = stream.open_stream(spec, urls, count, tuple(labels.keys) if labelled else None, origin)
    if not labelled:
        parts = {name: stream.uncaptioned(part, spec) for name, part in parts.items()}
    good, bad = find_bad_rows([row for part in parts.values() for row in part], labels.keys if labelled else None,
                              spec.max_image_pixels, labelled=labelled)
    report_bad_rows(bad, where, spec.on_bad_rows)
    kept = {id(row) for row in good}
    split = {name: [Example(row.image, labels.index(row.label) if labelled else -1, row.text)
                    for row in part if id(row) in kept] for name, part in parts.items()}
    val, test = split.get("val", []), split["test"]
    if not test:
        raise DataError(f"data.eval_path: no usable sample in {spec.eval_path!r}")
    info = {"source": spec.source, "where": str(spec.path), "labelled": labelled, "classes": len(labels),
            "stream": True, "labels_from": origin if labelled else None,
            "counts": {"train": source.length, "val": len(val), "test": len(test)},
            "train_length": "counted" if source.counted else "data.samples_per_epoch", "shards": len(source.urls),
            "stream_bad_samples": source.bad,
            "shuffle_buffer": spec.shuffle_buffer, "shots": None, "subset": None, "seed": seed, "split_seed": seed,
            "fingerprints": {"train": "stream", "val": examples_fingerprint(val), "test": examples_fingerprint(test)},
            "shifts": list(shifts), "skipped": len(bad), "skipped_rows": [str(b) for b in bad[:MAX_LISTED_SKIPS]]}
    return DataSplits([], val, test, labels, info, shifts, stream=source)


def _stream_labels(spec: DataSpec, count: StreamCount | None, rows: list[Row], labelled: bool, where: str,
                   ) -> tuple[LabelSet, str]:
    """The label set of a stream and where it came from: data.classes; else the labels of the counting pass and
    the held-out shards; else (data.samples_per_epoch: no pass) the held-out shards' labels only, a training label
    outside them being an error at the sample that carries it. Held-out and training shards are both labelled, or
    neither."""
    held_out = any(row.label is not None for row in rows)
    if held_out != labelled:
        raise DataError(f"data.eval_path/val_path {where!r} {'have' if held_out else 'lack'} labels (a .cls member or "
                        f"a json {spec.label_column!r} key) but the training shards {spec.path!r} "
                        f"{'do not' if held_out else 'do'}: give both labels, or neither")
    if not labelled:
        if spec.classes is not None:
            raise DataError(f"data.classes: the shards of {spec.path!r} carry no labels (caption data), so there are "
                            "no classes to list")
        return LabelSet.from_spec(spec, [], where=str(spec.path), min_classes=0), ""
    found = [row.label for row in rows if row.label is not None and row.problem is None]
    origin = "the held-out shards (data.eval_path/val_path)" if count is None else "the counting pass"
    if spec.classes is not None:
        origin = "data.classes"
        training = count.labels.items() if count is not None else ()
        outside = [(label, name) for label, name in training if label not in spec.classes]
        if outside:
            label, name = outside[0]
            raise DataError(f"stream sample {name} has the label {label!r}, which is not in data.classes "
                            f"({len(outside)} training labels are not); list every class of the training shards in "
                            "data.classes to fix it")
    labels = LabelSet.from_spec(spec, found + list(count.labels if count else ()), where=str(spec.path), min_classes=2)
    return labels, origin


def _split_held_out(examples: list[Example], held_out: list[bool], spec: DataSpec, seed: int, names: list[str],
                    ) -> tuple[list[Example], list[Example], list[Example]]:
    """`data.eval_path`: its rows are the test split; val is `data.split.val` of the rest (stratified)."""
    test = [example for example, out in zip(examples, held_out) if out]
    train = [example for example, out in zip(examples, held_out) if not out]
    if spec.split.val == 0:
        return train, [], test
    split_seed = spec.split.seed if spec.split.seed is not None else seed
    train, _, val = split_examples(train, SplitSpec(val=0.0, test=spec.split.val), split_seed, names)
    return train, val, test


def _split(examples: list[Example], spec: DataSpec, seed: int, names: list[str],
           ) -> tuple[list[Example], list[Example], list[Example]]:
    """Stratified splits by `data.split.seed` (default: the run's seed); with `data.subset` (digits), only within
    the fixed pre-training/held-out partition.

    `subset: heldout` splits the held-out part by `data.split`. `subset: pretrain` trains on the whole pre-training
    part and takes val and test from the held-out part in the ratio `split.val : split.test` (all of it is test when
    `split.val` is 0), so a pre-training run reports accuracy on images it never saw.
    """
    if spec.split.seed is not None:
        seed = spec.split.seed
    if spec.subset is None:
        return split_examples(examples, spec.split, seed, names)
    from mmpeft.data.digits import partition_digits

    pretrain, heldout = partition_digits(examples)
    if spec.subset == "heldout":
        return split_examples(heldout, spec.split, seed, names)
    if spec.split.val == 0:
        return pretrain, [], heldout
    test_share = spec.split.test / (spec.split.val + spec.split.test)
    val, _, test = split_examples(heldout, SplitSpec(val=0.0, test=test_share), seed, names)
    return pretrain, val, test


def _per_class(examples: list[Example], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for example in examples:
        if example.label >= 0:
            counts[example.label] += 1
    return counts
