"""Streamed WebDataset shards (`data.stream: true`): the training split read in order through `webdataset`.

Why a stream: shards behind URLs or `pipe:` commands (s3, http, gcs) cannot be seeked, and random reads across
shards are slow on network file systems. An epoch reads every shard once, front to back, in an order shuffled by
(seed, epoch), and mixes samples through a shuffle buffer seeded by (seed, epoch): the same seed and epoch give
the same samples in the same order, every time. Here are the raw stages (shard list, raw samples, usable check,
counting); mmpeft.data.stream_dataset turns the stream into training items.

A sample of caption data is usable when it has an image member and a caption (a `txt`, or a json caption); of a
labelled stream (`StreamSource.classes` set), when it has an image member and a label (a `cls`, or the json's
`data.label_column`), the indexed reader's rule. The check reads the small members only, never an image, so
counting an epoch and skipping to a resume position decode nothing. A label outside the label set is an error.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from mmpeft.data.errors import DataError
from mmpeft.data.images import PIXEL_CAP_HINT, over_pixel_cap, to_rgb
from mmpeft.data.shards import IMAGE_EXTENSIONS, expand_shards, is_remote, read_shards
from mmpeft.data.sources import Row
from mmpeft.specs import DataSpec

logger = logging.getLogger("mmpeft")



@dataclass(frozen=True)
class StreamSource:
    """The shards of a streamed training split and what an epoch is made of."""

    urls: tuple[str, ...]
    length: int  # usable samples per epoch (data.samples_per_epoch, or counted)
    counted: bool  # True: `length` is one pass over the shards; False: data.samples_per_epoch
    shuffle_buffer: int
    text_column: str
    where: str  # the pattern, for messages
    bad: int | None = None  # bad samples of one pass, when counted
    classes: tuple[str, ...] | None = None  # a labelled stream's class keys in label order; None: caption data
    label_column: str = "label"
    classes_from: str = "data.classes"  # where the label set came from, for the out-of-set error
    max_pixels: int | None = None  # data.max_image_pixels: a sample's header is checked before it is decoded

    @cached_property
    def class_index(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.classes or ())}


@dataclass
class StreamCount:
    """One pass over the training shards (small members only): how many samples have an image with a caption,
    with a label, and every raw label with the first sample carrying it (`shard:key`)."""

    samples: int = 0
    captioned: int = 0
    labelled: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, image: bool, caption: str | None, label: str | None) -> None:
        self.samples += 1
        self.captioned += image and caption is not None
        self.labelled += image and label is not None
        if image and label is not None:
            self.labels.setdefault(label, name)


def shard_urls(pattern: str) -> list[str]:
    """Brace-expanded shard names: local ones globbed and checked, URLs and `pipe:` commands as written."""
    return expand_shards(pattern, remote=True, needs="data.stream")


def shard_name(url: str) -> str:
    """How messages and positions name a shard: its file name (`train-0003.tar`, also for `pipe:cat .../x.tar`)."""
    return url.rstrip("/").split("/")[-1].split()[-1] if url.strip() else url


def open_stream(spec: DataSpec, urls: list[str], count: StreamCount | None,
                classes: tuple[str, ...] | None, classes_from: str = "data.classes") -> StreamSource:
    """The training stream of a recipe: its shards, its epoch length (`count`ed once unless given) and, for a
    labelled stream, its class keys in label order."""
    length, bad = spec.samples_per_epoch, None
    if count is not None:
        length = count.labelled if classes is not None else count.captioned
        bad = count.samples - length
    wanted = "an image and a label" if classes is not None else "an image and a caption"
    if length == 0:
        raise DataError(f"data.path: no usable sample ({wanted}) in the {len(urls)} shards of {spec.path!r}")
    if bad:
        logger.warning("stream: %d of %d samples of %s are bad (no image member or no %s) and are skipped in "
                       "every epoch, each with a warning naming it", bad, length + bad, spec.path,
                       "label" if classes is not None else "caption")
    return StreamSource(tuple(urls), length, count is not None, spec.shuffle_buffer, spec.text_column,
                        str(spec.path), bad, classes, spec.label_column, classes_from, spec.max_image_pixels)


def count_samples(urls: list[str], spec: DataSpec) -> StreamCount:
    """One pass over the shards. Local shards reuse the indexed reader's header scan; URLs are read through
    webdataset once, keys and small members only (a tqdm bar shows the shards). No image is decoded."""
    count = StreamCount()
    for url in tqdm(urls, desc="counting samples", leave=False, disable=None):
        if is_remote(url):
            for sample in webdataset_samples([url]):
                count.add(sample_name(sample), image_member(sample) is not None, caption_of(sample, spec.text_column),
                          label_of(sample, spec.label_column))
        else:
            for row in read_shards(url, spec)[0]:
                count.add(row.source, row.problem is None, row.text, row.label if row.problem is None else None)
    return count


def held_out_rows(pattern: str, spec: DataSpec) -> list[Row]:
    """Rows of an evaluation pattern, in shard order, unshuffled, with their captions and labels as read (the
    caller marks what its kind of data lacks: `uncaptioned`, or find_bad_rows for labels). Local shards are indexed
    in place (images read by seek when used); shards behind URLs are read once through webdataset and their images
    decoded into memory (evaluation sets are small). A bad sample is a bad row named `shard:key`."""
    urls = shard_urls(pattern)
    if not any(is_remote(url) for url in urls):
        return read_shards(pattern, spec)[0]
    rows = []
    for sample in tqdm(webdataset_samples(urls), desc=f"reading {pattern}", leave=False, disable=None):
        caption, label = caption_of(sample, spec.text_column), label_of(sample, spec.label_column)
        if image_member(sample) is None or (caption is None and label is None):
            rows.append(Row("", None, None, sample_name(sample), problem(sample, spec.text_column)))
            continue
        with Image.open(io.BytesIO(sample[image_member(sample)])) as opened:
            if detail := over_pixel_cap(opened, spec.max_image_pixels):  # from the header: never decoded
                rows.append(Row("", None, None, sample_name(sample),
                                f"image is too large ({detail}): {PIXEL_CAP_HINT}"))
                continue
            rows.append(Row(to_rgb(opened), label, caption, sample_name(sample)))
    return rows


def uncaptioned(rows: list[Row], spec: DataSpec) -> list[Row]:
    """Caption data: a held-out row without a caption is a bad row (a label alone does not make it usable)."""
    return [row if row.text is not None or row.problem is not None else
            Row(row.image, row.label, None, row.source, no_caption(spec.text_column)) for row in rows]


def webdataset_samples(urls: list[str] | tuple[str, ...], buffer: int = 0, seed: str | None = None,
                       ) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes per member) of `urls` in this order through `webdataset.WebDataset`; each gets
    `__offset__`, its position within its shard, before the shuffle buffer (`buffer` samples, seeded) mixes them."""
    import webdataset as wds

    pipeline = wds.WebDataset(list(urls), shardshuffle=False, workersplitter=None, empty_check=False
                              ).map(_ShardOffsets())
    if buffer > 0:
        pipeline = pipeline.shuffle(buffer, initial=buffer, seed=seed)
    try:
        yield from pipeline
    except (OSError, tarfile.TarError) as error:  # webdataset adds the url as the error's last argument
        url = next((arg for arg in error.args if isinstance(arg, str) and arg in urls), "a shard")
        detail = error.args[0] if error.args else error
        raise DataError(f"cannot read {url!r} through webdataset: {type(error).__name__}: {detail}") from error


class _ShardOffsets:
    """Numbers the samples of each shard as they stream by (shards are read one after the other)."""

    def __init__(self) -> None:
        self.url, self.offset = None, -1

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        url = sample.get("__url__")
        self.url, self.offset = url, (self.offset + 1 if url == self.url else 0)
        sample["__offset__"] = self.offset
        return sample


UNLABELLED_LIMIT = 100  # a labelled stream whose first this many samples have no label is refused there


def epoch_samples(source: StreamSource, seed: int, epoch: int) -> Iterator[tuple[dict[str, Any], str | None, int]]:
    """(raw sample, caption, class int or -1) of every usable sample of an epoch, endlessly: pass after pass over
    the shards, each pass's shard order and buffer seeded by (seed, epoch, pass). Bad samples are counted and
    skipped with a warning naming `shard:key`; a pass without one usable sample is an error (it would loop
    forever), and so are the first UNLABELLED_LIMIT samples of a labelled stream without any label."""
    for number in range(1 << 30):
        order = list(source.urls)
        random.Random(f"mmpeft-stream-shards:{seed}:{epoch}:{number}").shuffle(order)
        good = bad = 0
        for sample in webdataset_samples(order, source.shuffle_buffer, f"mmpeft-stream-buffer:{seed}:{epoch}:{number}"):
            fields = usable(sample, source)
            if fields is None:
                bad += 1
                logger.warning("stream: skipped bad sample %s (%s)", sample_name(sample), problem(sample, source))
                if good == 0 and bad >= UNLABELLED_LIMIT and source.classes is not None:
                    raise DataError(no_labels(source, f"its first {bad} samples"))
                continue
            good += 1
            yield sample, *fields
        if good == 0:
            if source.classes is not None:
                raise DataError(no_labels(source, f"a whole epoch of its {len(order)} shards ({bad} samples)"))
            raise DataError(f"data.path: a whole epoch of the {len(order)} shards of {source.where!r} yielded no "
                            f"usable sample ({bad} bad: each needs an image member and a caption)")


def no_labels(source: StreamSource, what: str) -> str:
    return (f"data.path: {source.where!r} is read as labelled (train.objective: classification needs a label per "
            f"sample), but {what} yielded no sample with an image and a label (a .cls member, or a json with a "
            f"{source.label_column!r} key): label the shards, or train caption data with train.objective: "
            "contrastive")


def sample_name(sample: dict[str, Any]) -> str:
    return f"{shard_name(str(sample.get('__url__', '?')))}:{sample.get('__key__')}"


def image_member(sample: dict[str, Any]) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def usable(sample: dict[str, Any], source: StreamSource) -> tuple[str | None, int] | None:
    """(caption, class int) of a usable sample, else None; no image is decoded. Caption data needs a caption
    (class -1); a labelled stream needs a label (the caption stays optional), and a label outside the label set is
    an error naming the sample."""
    if image_member(sample) is None:
        return None
    caption = caption_of(sample, source.text_column)
    if source.classes is None:
        return None if caption is None else (caption, -1)
    label = label_of(sample, source.label_column)
    if label is None:
        return None
    if label not in source.class_index:
        raise DataError(outside_classes(sample_name(sample), label, source))
    return caption, source.class_index[label]


def outside_classes(name: str, label: str, source: StreamSource) -> str:
    shown = ", ".join(source.classes[:20]) + (", ..." if len(source.classes) > 20 else "")
    return (f"stream sample {name} has the label {label!r}, which is not in the label set from "
            f"{source.classes_from} ({len(source.classes)} classes: {shown}); list every class of the training shards "
            "in data.classes to fix it")


def label_of(sample: dict[str, Any], label_column: str) -> str | None:
    """`cls`, else the json's `data.label_column` field (as the indexed reader reads labels)."""
    label = _text(sample.get("cls"))
    if label:
        return label
    value = json_meta(sample).get(label_column)
    return None if value in (None, "") or isinstance(value, (list, dict)) else str(value)  # as the indexed reader


def caption_of(sample: dict[str, Any], text_column: str) -> str | None:
    """`txt`, else the json's `data.text_column` or `caption` field."""
    text = _text(sample.get("txt"))
    if text:
        return text
    meta = json_meta(sample)
    for name in (text_column, "caption"):
        if isinstance(meta.get(name), (list, dict)):  # several captions are not one: unusable, as indexed
            return None
        if meta.get(name) not in (None, ""):
            return str(meta[name]).strip() or None
    return None


def json_meta(sample: dict[str, Any]) -> dict:
    """The sample's json member as an object, parsed once per sample ({} when absent, invalid or not an object)."""
    if "__json__" not in sample:
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError:
            meta = {}
        sample["__json__"] = meta if isinstance(meta, dict) else {}
    return sample["__json__"]


def problem(sample: dict[str, Any], source: StreamSource | str) -> str:
    """Why a sample is bad; `source` is the stream, or the text column of caption data."""
    if image_member(sample) is None:
        members = ", ".join(f".{k}" for k in sample if not k.startswith("__"))
        return f"no image member (one of .{', .'.join(IMAGE_EXTENSIONS)}; found {members or 'none'})"
    if isinstance(source, str):
        return no_caption(source)
    if source.classes is not None:
        return f"no label (a .cls member, or a json with a {source.label_column!r} key)"
    return no_caption(source.text_column)


def no_caption(text_column: str) -> str:
    return f"no caption (a .txt member, or a json with a 'caption' or {text_column!r} key)"


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return (value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)).strip()
