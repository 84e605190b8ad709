"""The streamed training split as the trainer sees it: a dataset with a length whose batches come in stream order.

Why this shape: the trainer plans an epoch as index batches (its schedule needs the epoch length) and resumes at
(epoch, batch). For a stream only the batch sizes matter: `StreamLoader` fills the batches the trainer asks for
with the next samples of the epoch's stream, so batch b of epoch e holds stream positions b x batch_size onwards
and the item's `index` is its stream position. A resumed epoch regenerates the same stream and skips the samples
of the batches already trained in the raw stage (keys and text members only, no image decoded).

One reading worker at most: webdataset splits shards between workers, which would make the order depend on the
worker count; with 0 or 1 worker the order is the stream's. `train.num_workers: auto` picks 1 where a spare core
exists (decoding overlaps training), else 0. The decoded-image cache does not apply to a stream (every epoch reads
the shards again); evaluation sets are small and keep it.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from mmpeft.data.augment import augment, augment_enabled, check_augment
from mmpeft.data.dataset import ImageCollator
from mmpeft.data.errors import DataError
from mmpeft.data.images import PIXEL_CAP_HINT, over_pixel_cap, to_rgb
from mmpeft.data.shifts import apply_shifts, parse_shift
from mmpeft.data.stream import StreamSource, epoch_samples, image_member, sample_name, shard_name
from mmpeft.specs import AugmentSpec

logger = logging.getLogger("mmpeft")

PREFETCH_BATCHES = 4


class StreamDataset(IterableDataset):
    """Items of one epoch's stream in planned batches: {"image", "label", "index": stream position, ["text"],
    "key": "shard:key", "shard", "offset"}; label -1 for caption data (no class), the class int of a labelled
    stream (its caption, if any, stays the item's text)."""

    accepts_epoch_keys = False

    def __init__(self, source: StreamSource, shifts: str | tuple[str, ...] = (), augment: AugmentSpec | None = None,
                 seed: int = 0):
        self.source, self.shifts, self.seed, self.epoch = source, parse_shift(shifts), seed, 0
        if augment is not None:
            check_augment(augment)
        self.augment = augment if augment_enabled(augment) else None
        self.sizes: list[int] = [1] * source.length
        self.skip = 0

    def __len__(self) -> int:
        return self.source.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self, sizes: list[int], skip: int) -> None:
        """The batch sizes still to come this epoch, after `skip` samples already trained."""
        if skip < 0 or skip + sum(sizes) > len(self):
            raise ValueError(f"stream plan of {sum(sizes)} samples after {skip} exceeds the epoch's {len(self)}")
        self.sizes, self.skip = list(sizes), skip

    def positions(self, skip: int = 0) -> Iterator[tuple[int, dict[str, Any], str | None, int]]:
        """(stream position, raw sample, caption, class) from position `skip` to the end of the epoch, nothing
        decoded."""
        stream = epoch_samples(self.source, self.seed, self.epoch)
        for position, (sample, caption, label) in enumerate(stream):
            if position >= len(self):
                return
            if position >= skip:
                yield position, sample, caption, label

    def keys(self, skip: int = 0) -> list[str]:
        """`shard:key` of every sample of the epoch from `skip` on, in order (for tests and checks)."""
        return [sample_name(fields[1]) for fields in self.positions(skip)]

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        """The planned batches; after a skip, the first item names the last sample skipped ("after"), so the
        position a checkpoint recorded can be compared with where the regenerated stream is."""
        stream = self.positions(max(self.skip - 1, 0))
        after = sample_name(next(stream)[1]) if self.skip > 0 else None
        for size in self.sizes:
            batch = [self.item(*fields) for fields in islice(stream, size)]
            if len(batch) < size:
                raise DataError(f"stream {self.source.where!r} ended {size - len(batch)} samples early")
            if after is not None:
                batch[0]["after"], after = after, None
            yield batch

    def item(self, position: int, sample: dict[str, Any], caption: str | None, label: int = -1) -> dict[str, Any]:
        """Decode the one image member used (other members are never decoded)."""
        name = sample_name(sample)
        try:
            with Image.open(io.BytesIO(sample[image_member(sample)])) as opened:
                too_large(opened, name, self.source.max_pixels)
                image = to_rgb(opened)
        except DataError:
            raise
        except Exception as error:  # PIL raises many types for damaged bytes
            raise DataError(f"cannot decode the image of stream sample {name}: {type(error).__name__}: {error}. "
                            "Replace or remove the sample") from error
        image = apply_shifts(image, self.shifts, position)
        if self.augment is not None:
            rng = random.Random(f"mmpeft-augment:{self.seed}:{self.epoch}:{position}")
            image = augment(image, self.augment, rng)
        item = {"image": image, "label": label, "index": position, "key": name,
                "shard": shard_name(str(sample.get("__url__"))), "offset": int(sample["__offset__"])}
        return item if caption is None else {**item, "text": caption}


def too_large(image: Image.Image, name: str, max_pixels: int | None) -> None:
    """Refuse a stream image over data.max_image_pixels before a pixel of it is decoded."""
    if detail := over_pixel_cap(image, max_pixels):
        raise DataError(f"the image of stream sample {name} is too large ({detail}): {PIXEL_CAP_HINT}")


class StreamCollator:
    """ImageCollator's batch plus where the stream is: every sample's `shard:key` ("image_keys": each names one
    image) and the last sample's shard and offset ("stream_last")."""

    def __init__(self, collate: ImageCollator):
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(items)
        batch["image_keys"] = [item["key"] for item in items]
        last = items[-1]
        batch["stream_last"] = {"shard": last["shard"], "offset_in_shard": last["offset"], "key": last["key"],
                                "position": last["index"], "after": items[0].get("after")}
        return batch


class StreamLoader:
    """An epoch's batches, iterated by the trainer; remembers the position reached (for the checkpoint)."""

    def __init__(self, dataset: StreamDataset, loader: DataLoader, epoch: int, skip: int, batches: int,
                 expected: dict[str, Any] | None = None):
        self.dataset, self.loader, self.epoch, self.batches = dataset, loader, epoch, batches
        self.samples, self.expected = skip, expected
        self.last: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.samples += len(batch["image_keys"])
            self.last = batch.pop("stream_last")
            if self.expected is not None:
                self.check_resumed(self.last["after"])
            yield batch

    def check_resumed(self, after: str | None) -> None:
        """A resumed epoch skipped to the checkpoint's sample count; the last sample skipped should be the one the
        checkpoint recorded. If not, the shards changed since: say so (the run goes on from the count)."""
        if after != self.expected["key"]:
            logger.warning("stream: resumed epoch %d after %d samples at %s, but the checkpoint recorded %s there: "
                           "the shards changed since the checkpoint, so this epoch does not continue exactly",
                           self.epoch + 1, self.expected["samples"], after, self.expected["key"])
        self.expected = None

    def position(self) -> dict[str, Any] | None:
        """{"epoch", "samples" (trained this epoch), "shard", "offset_in_shard", "key"} of the last batch given."""
        if self.last is None:
            return None
        return {"epoch": self.epoch, "samples": self.samples, "shard": self.last["shard"],
                "offset_in_shard": self.last["offset_in_shard"], "key": self.last["key"]}


def stream_loader(dataset: StreamDataset, collate: ImageCollator, epoch: int, batches: list[list[int]],
                  workers: int, resumed: dict[str, Any] | None = None) -> StreamLoader:
    """The batches still to come in epoch `epoch` (the trainer gives the rest of the epoch: what is missing from
    the epoch's length was trained before a resume; a stream runs in one process, so no batch was dropped)."""
    sizes = [len(batch) for batch in batches]
    skip = len(dataset) - sum(sizes)
    dataset.set_epoch(epoch)
    dataset.plan(sizes, skip)
    kwargs: dict[str, Any] = {"prefetch_factor": PREFETCH_BATCHES} if workers > 0 else {}
    loader = DataLoader(dataset, batch_size=None, collate_fn=StreamCollator(collate), num_workers=min(workers, 1),
                        pin_memory=torch.cuda.is_available(), **kwargs)
    expected = resumed if resumed and resumed["epoch"] == epoch and resumed["samples"] == skip > 0 else None
    return StreamLoader(dataset, loader, epoch, skip, len(batches), expected)
