"""Streamed WebDataset shards (`data.stream: true`): the training split read in order through `webdataset`.

Why a stream: shards behind URLs or `pipe:` commands (s3, http, gcs) cannot be seeked, and random reads across
shards are slow on network file systems. An epoch reads every shard once, front to back, in an order shuffled by
(seed, epoch), and mixes samples through a shuffle buffer seeded by (seed, epoch): the same seed and epoch give
the same samples in the same order, every time. Here are the raw stages (shard list, raw samples, usable check,
counting); mmpeft.data.stream_dataset turns the stream into training items.

A sample is usable when it has an image member and a caption (a `txt`, or a json caption); the check reads the
small text members only, never an image, so counting an epoch and skipping to a resume position decode nothing.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from mmpeft.data.errors import DataError
from mmpeft.data.images import to_rgb
from mmpeft.data.shards import IMAGE_EXTENSIONS, read_shards
from mmpeft.data.sources import Row
from mmpeft.specs import DataSpec

logger = logging.getLogger("mmpeft")

REMOTE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)", re.IGNORECASE)  # what webdataset opens besides local files


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


def is_remote(url: str) -> bool:
    return bool(REMOTE.match(url))


def shard_urls(pattern: str) -> list[str]:
    """Brace-expanded shard names (webdataset's syntax); local ones are globbed and must exist, URLs and `pipe:`
    commands are taken as written (they can only be checked by reading them)."""
    try:
        import braceexpand
        import webdataset  # noqa: F401  (the optional extra that brings braceexpand)
    except ImportError:
        raise DataError("data.stream needs the webdataset package: pip install 'mmpeft[webdataset]'") from None
    names = []
    for part in braceexpand.braceexpand(pattern):
        names += [part] if is_remote(part) else (sorted(glob.glob(part)) or [part])
    missing = [name for name in names if not is_remote(name) and not Path(name).is_file()]
    if missing:
        raise DataError(f"{pattern!r}: {len(missing)} of {len(names)} shards do not exist (first: {missing[0]!r})")
    return names


def shard_name(url: str) -> str:
    """How messages and positions name a shard: its file name (`train-0003.tar`, also for `pipe:cat .../x.tar`)."""
    return url.rstrip("/").split("/")[-1].split()[-1] if url.strip() else url


def open_stream(spec: DataSpec) -> StreamSource:
    """The training stream of a recipe: its shards and its epoch length (counted once unless given)."""
    urls = shard_urls(str(spec.path))
    length, counted, bad = spec.samples_per_epoch, False, None
    if length is None:
        (length, bad), counted = count_usable(urls, spec), True
    if length == 0:
        raise DataError(f"data.path: no usable sample (an image and a caption) in the {len(urls)} shards of "
                        f"{spec.path!r}")
    if bad:
        logger.warning("stream: %d of %d samples of %s are bad (no image member or no caption) and are skipped in "
                       "every epoch, each with a warning naming it", bad, length + bad, spec.path)
    return StreamSource(tuple(urls), length, counted, spec.shuffle_buffer, spec.text_column, str(spec.path), bad)


def count_usable(urls: list[str], spec: DataSpec) -> tuple[int, int]:
    """(usable, bad) samples of one pass. Local shards reuse the indexed reader's header scan; URLs are read through
    webdataset once, keys and text members only (a tqdm bar shows the shards). No image is decoded."""
    good = bad = 0
    for url in tqdm(urls, desc="counting samples", leave=False, disable=None):
        if is_remote(url):
            found = [usable(sample, spec.text_column) is not None for sample in webdataset_samples([url])]
        else:
            found = [row.problem is None and row.text is not None for row in read_shards(url, spec)[0]]
        good, bad = good + sum(found), bad + found.count(False)
    return good, bad


def held_out_rows(pattern: str, spec: DataSpec) -> list[Row]:
    """Rows of an evaluation pattern, in shard order, unshuffled. Local shards are indexed in place (images read by
    seek when used); shards behind URLs are read once through webdataset and their images decoded into memory
    (evaluation sets are small). A bad sample is a bad row named `shard:key`, reported with the others."""
    urls = shard_urls(pattern)
    if not any(is_remote(url) for url in urls):
        return [row if row.text is not None or row.problem is not None else
                replace(row, problem=no_caption(spec.text_column)) for row in read_shards(pattern, spec)[0]]
    rows = []
    for sample in tqdm(webdataset_samples(urls), desc=f"reading {pattern}", leave=False, disable=None):
        caption = usable(sample, spec.text_column)
        if caption is None:
            rows.append(Row("", None, None, sample_name(sample), problem(sample, spec.text_column)))
            continue
        with Image.open(io.BytesIO(sample[image_member(sample)])) as opened:
            rows.append(Row(to_rgb(opened), None, caption, sample_name(sample)))
    return rows


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


def epoch_samples(source: StreamSource, seed: int, epoch: int) -> Iterator[tuple[dict[str, Any], str]]:
    """(raw sample, caption) of every usable sample of an epoch, endlessly: pass after pass over the shards, each
    pass's shard order and buffer seeded by (seed, epoch, pass). Bad samples are counted and skipped with a warning
    naming `shard:key`; a pass without one usable sample is an error (it would loop forever)."""
    for number in range(1 << 30):
        order = list(source.urls)
        random.Random(f"mmpeft-stream-shards:{seed}:{epoch}:{number}").shuffle(order)
        good = bad = 0
        for sample in webdataset_samples(order, source.shuffle_buffer, f"mmpeft-stream-buffer:{seed}:{epoch}:{number}"):
            caption = usable(sample, source.text_column)
            if caption is None:
                bad += 1
                logger.warning("stream: skipped bad sample %s (%s)", sample_name(sample),
                               problem(sample, source.text_column))
                continue
            good += 1
            yield sample, caption
        if good == 0:
            raise DataError(f"data.path: a whole epoch of the {len(order)} shards of {source.where!r} yielded no "
                            f"usable sample ({bad} bad: each needs an image member and a caption)")


def sample_name(sample: dict[str, Any]) -> str:
    return f"{shard_name(str(sample.get('__url__', '?')))}:{sample.get('__key__')}"


def image_member(sample: dict[str, Any]) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def usable(sample: dict[str, Any], text_column: str) -> str | None:
    """The caption of a usable sample (an image member and a caption), else None; no image is decoded."""
    if image_member(sample) is None:
        return None
    return caption_of(sample, text_column)


def caption_of(sample: dict[str, Any], text_column: str) -> str | None:
    """`txt`, else the json's `data.text_column` or `caption` field."""
    text = _text(sample.get("txt"))
    if text or "json" not in sample:
        return text or None
    try:
        meta = json.loads(sample["json"])
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    for name in (text_column, "caption"):
        if meta.get(name) not in (None, ""):
            return str(meta[name]).strip() or None
    return None


def problem(sample: dict[str, Any], text_column: str) -> str:
    if image_member(sample) is None:
        members = ", ".join(f".{k}" for k in sample if not k.startswith("__"))
        return f"no image member (one of .{', .'.join(IMAGE_EXTENSIONS)}; found {members or 'none'})"
    return no_caption(text_column)


def no_caption(text_column: str) -> str:
    return f"no caption (a .txt member, or a json with a 'caption' or {text_column!r} key)"


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return (value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)).strip()
