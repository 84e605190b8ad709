"""The one place DataLoaders are built: training, evaluation, feature caching and label scoring all come here.

Why one helper: the decoded-image cache, the worker count, pinned memory and prefetching are decided once, from the
recipe (`data.image_cache`, `train.num_workers`, set for a run by `loader_settings`), instead of each caller writing
`DataLoader(..., num_workers=0)`. Workers never change results: an item depends on (seed, epoch, index) only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from mmpeft.data.dataset import ImageCollator, ImageDataset
from mmpeft.data.image_cache import IMAGE_CACHE, ImageCache, ImageFitter, choose_storage
from mmpeft.data.stream_dataset import StreamDataset, StreamLoader, stream_loader

logger = logging.getLogger("mmpeft")

MAX_AUTO_WORKERS = 4  # "auto" never starts more than this many workers per process
PREFETCH_BATCHES = 4  # batches each worker keeps ready
CPUS_ENV = "MMPEFT_CPUS"  # cores a grid cell may use (grid.cpus_per_cell), set in its worker's environment
FILL_WORKERS_FROM = 32  # images to cache before decoding them in worker processes pays for starting them
FILL_BATCH = 16


class ImageModel(ImageFitter, Protocol):
    """What a loader needs from a backbone (mmpeft.backbones.Backbone implements it)."""

    def preprocess(self, images: list) -> Any: ...

    def preprocess_fitted(self, arrays: list[np.ndarray]) -> Any: ...


@dataclass(frozen=True)
class LoaderSettings:
    image_cache: str = "auto"  # data.image_cache
    num_workers: int | str = "auto"  # train.num_workers


DEFAULT_SETTINGS = LoaderSettings()
_SETTINGS: ContextVar[LoaderSettings | None] = ContextVar("mmpeft_loader_settings", default=None)


@contextlib.contextmanager
def loader_settings(image_cache: str | bool = "auto", num_workers: int | str = "auto") -> Iterator[LoaderSettings]:
    """Every loader built inside the block uses these settings (a run wraps itself in its recipe's)."""
    settings = LoaderSettings("off" if image_cache is False else image_cache, num_workers)
    token = _SETTINGS.set(settings)
    try:
        yield settings
    finally:
        _SETTINGS.reset(token)


def current_settings() -> LoaderSettings:
    return _SETTINGS.get() or DEFAULT_SETTINGS


def available_cores() -> int:
    """Cores this process may use: shared among the processes of a multi-process run; a grid cell's CPU slots in a
    grid worker (CPUS_ENV, set by the grid executors)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    granted = os.environ.get(CPUS_ENV)
    return min(cores, max(1, int(float(granted)))) if granted else cores


def auto_workers(ready: bool) -> int:
    """0 when items come ready (fitted, in the cache, no augmentation): a worker would only copy them; else one
    worker per spare core (the training process keeps one), at most MAX_AUTO_WORKERS."""
    return 0 if ready else max(0, min(MAX_AUTO_WORKERS, available_cores() - 1))


class EpochBatches:
    """A batch sampler whose batches are set per epoch, yielding (epoch, index) keys: one loader, and its persistent
    workers, serve every epoch, and each item still knows its epoch."""

    def __init__(self, with_epoch: bool = True):
        self.with_epoch = with_epoch
        self.epoch, self.batches = 0, []

    def set(self, epoch: int, batches: list[list[int]]) -> None:
        self.epoch, self.batches = epoch, batches

    def __iter__(self) -> Iterator[list]:
        for batch in self.batches:
            yield [(self.epoch, i) for i in batch] if self.with_epoch else list(batch)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(dataset: Dataset, model: ImageModel | None, *, batch_size: int | None = None,
                batch_sampler: Any = None, collate: Callable | None = None, generator: torch.Generator | None = None,
                persistent: bool = False, num_workers: int | str | None = None,
                cache: ImageCache = IMAGE_CACHE) -> DataLoader:
    """A DataLoader over `dataset` (an ImageDataset, a Subset of one, or a dataset with its own `collate`), in order.

    ImageDatasets are bound to `model`'s processor and their images cached first (a progress bar on a large
    first pass); `train.num_workers: auto` then picks the worker count (`num_workers` overrides the run's setting).
    """
    settings = current_settings()
    if num_workers is not None:
        settings = LoaderSettings(settings.image_cache, num_workers)
    ready = True
    if model is not None:
        dataset, ready = bind_images(dataset, model, settings, cache)
    collate = collate or getattr(dataset, "collate", None)
    if collate is None and model is not None:
        collate = ImageCollator(model.preprocess, model.preprocess_fitted)
    workers = settings.num_workers if settings.num_workers != "auto" else auto_workers(ready)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {"persistent_workers": persistent, "prefetch_factor": PREFETCH_BATCHES}
    if batch_sampler is None:
        kwargs.update(batch_size=batch_size or 1, shuffle=False)
    else:
        kwargs["batch_sampler"] = batch_sampler
    return DataLoader(dataset, collate_fn=collate, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      generator=generator, **kwargs)


class EpochLoader:
    """The training loader: built at the first epoch and reused, so its workers persist across epochs; each epoch
    sets its batches. Its own generator: creating an iterator must not draw from the global RNG dropout uses."""

    def __init__(self, dataset: Dataset, model: ImageModel, seed: int, num_workers: int | str = "auto"):
        self.dataset, self.model, self.seed, self.num_workers = dataset, model, seed, num_workers
        self.batches = EpochBatches(with_epoch=getattr(dataset, "accepts_epoch_keys", False))
        self.generator = torch.Generator()
        self.loader: DataLoader | None = None
        self.stream: StreamLoader | None = None
        self.resumed: dict | None = None

    def epoch(self, epoch: int, batches: list[list[int]]) -> DataLoader | StreamLoader:
        """The loader of an epoch's `batches`; a streamed dataset fills batches of the same sizes in stream order."""
        if isinstance(self.dataset, StreamDataset):
            self.stream = stream_loader(self.dataset, ImageCollator(self.model.preprocess), epoch, batches,
                                        self.stream_workers(), self.resumed)
            self.resumed = None
            return self.stream
        self.batches.set(epoch, batches)
        self.generator.manual_seed(self.seed + epoch)
        if self.loader is None:
            self.loader = make_loader(self.dataset, self.model, batch_sampler=self.batches, generator=self.generator,
                                      persistent=self.batches.with_epoch, num_workers=self.num_workers)
        return self.loader

    def stream_workers(self) -> int:
        """0 or 1 reading worker for a stream (more would split the shards and change the order): "auto" is 1
        where a core is spare."""
        workers = current_settings().num_workers if self.num_workers == "auto" else self.num_workers
        return (1 if available_cores() > 1 else 0) if workers == "auto" else min(int(workers), 1)

    def resume_at(self, position: dict | None) -> None:
        """The stream position a checkpoint recorded: the resumed epoch checks it reached the same sample."""
        self.resumed = position

    def position(self) -> dict | None:
        """Where a streamed epoch is (shard, offset in it, samples trained this epoch); None for indexed data."""
        return self.stream.position() if self.stream is not None else None

    def close(self) -> None:
        """Stop persistent workers (they would otherwise live until the loader is garbage-collected)."""
        self.loader = self.stream = None


def bind_images(dataset: Dataset, model: ImageModel, settings: LoaderSettings,
                cache: ImageCache = IMAGE_CACHE) -> tuple[Dataset, bool]:
    """(the dataset reading fitted images through the cache, whether its items come ready without work)."""
    base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
    if not isinstance(base, ImageDataset):
        return dataset, getattr(base, "collate", None) is not None  # cached features: ready
    bound = base if base.images is not None else base.fitted(model, settings.image_cache, cache)
    stored = fill_cache(bound, range(len(bound)) if indices is None else indices, settings)
    ready = stored and bound.augment is None
    return (bound if indices is None else Subset(bound, indices)), ready


def fill_cache(dataset: ImageDataset, indices: Sequence[int], settings: LoaderSettings) -> bool:
    """Fit and store every image of `indices` not cached yet; True when all of them are cached afterwards."""
    images = dataset.images
    if images is None or images.mode == "off":
        return False
    wanted = sorted(set(indices))
    missing = [i for i in wanted if images.cached(dataset.examples[i], i, dataset.shifts) is None]
    if not missing:
        return True
    first = images.fit(dataset.examples[missing[0]], missing[0], dataset.shifts)
    storage = choose_storage(images.mode, images.key, len(missing), first.nbytes, images.cache)
    if storage is None:
        return False
    workers = 0
    if len(missing) >= FILL_WORKERS_FROM:
        cores = available_cores()  # one core: decoding here beats starting a worker to do it
        auto = 0 if cores == 1 else min(MAX_AUTO_WORKERS, cores)
        workers = settings.num_workers if settings.num_workers != "auto" else auto
    loader = DataLoader(_FitItems(dataset, missing[1:]), batch_size=FILL_BATCH, num_workers=workers,
                        collate_fn=list, generator=torch.Generator().manual_seed(0))
    _store(dataset, missing[0], first, storage)
    for batch in tqdm(loader, desc=f"caching {len(missing)} images", leave=False,
                      disable=None if len(missing) >= FILL_WORKERS_FROM else True):
        for index, pixels in batch:
            _store(dataset, index, pixels, storage)
    return True


def _store(dataset: ImageDataset, index: int, pixels: np.ndarray, storage: str) -> None:
    images = dataset.images
    location, version = images.entry(dataset.examples[index], index, dataset.shifts)
    images.cache.put(images.key, location, version, pixels, storage)
    images.cache.stats.fitted += 1


class _FitItems(Dataset):
    """(index, fitted pixels) of some items: the cache's first pass, decoded in worker processes."""

    def __init__(self, dataset: ImageDataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, np.ndarray]:
        index = self.indices[position]
        return index, self.dataset.images.fit(self.dataset.examples[index], index, self.dataset.shifts)
