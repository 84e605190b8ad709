"""Decoded images, fitted once to a backbone's processor and kept: in memory for the process, or as memory-mapped
.npy files under $MMPEFT_CACHE/images that later processes (and the next cell of a grid) read back.

Why here: decoding a JPEG and resizing it to the processor's input size costs more than a training step of a small
adapter, and it gives the same pixels every epoch, evaluation pass, seed, grid cell and sequence task. What is kept
is the image after `data.shift` and the processor's resize/crop (uint8, height x width x 3); augmentation and the
processor's rescale/normalise run after the cache, so results are the same with the cache on or off.

An entry is found by where the image lives (file path, `datasets` row, or the pixels of an in-memory image), the
shifts, and the fit (the processor's settings); it is valid for one version of the file (size + modification time):
a changed file is detected, its old entry dropped and the image fitted again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from mmpeft.core.io import atomic_path, cache_dir, caches_shared
from mmpeft.data.errors import DataError
from mmpeft.data.sources import DatasetImage, ImageRef, ShardImage

logger = logging.getLogger("mmpeft")

MODES = ("auto", "memory", "disk", "off")
INDEX_SEEDED_SHIFTS = ("noise",)  # shifts whose output depends on the example's position (see data/shifts.py)
DEFAULT_MEMORY_MB = 2048  # "auto" keeps images in memory up to this much (MMPEFT_IMAGE_CACHE_MB), then on disk
DISK_HEADROOM = 1.1  # a disk cache must fit with this margin on top of its estimated size
_PIXEL_DIGESTS: dict[int, tuple[weakref.ref, str]] = {}


class ImageFitter(Protocol):
    """What the cache needs from a backbone (mmpeft.backbones.Backbone implements it)."""

    def image_fit_key(self, room: bool) -> str: ...

    def fit_image(self, image: Image.Image, room: bool) -> np.ndarray: ...


def memory_limit_bytes() -> int:
    return int(float(os.environ.get("MMPEFT_IMAGE_CACHE_MB", DEFAULT_MEMORY_MB)) * 2 ** 20)


def image_identity(image: ImageRef) -> tuple[str, str]:
    """(where the image lives, which version of it): a file's path and its size:mtime; rows and pixels by content."""
    if isinstance(image, str):
        stat = os.stat(image)
        return f"file:{os.path.abspath(image)}", f"{stat.st_size}:{stat.st_mtime_ns}"
    if isinstance(image, DatasetImage):
        fingerprint = getattr(image.dataset, "_fingerprint", None) or str(id(image.dataset))
        return f"dataset:{fingerprint}:{image.column}:{image.index}", ""
    if isinstance(image, ShardImage):
        stat = os.stat(image.shard)
        where = f"shard:{os.path.abspath(image.shard)}:{image.member}@{image.offset}"
        return where, f"{stat.st_size}:{stat.st_mtime_ns}"
    return f"pixels:{pixel_digest(image)}", ""


def pixel_digest(image: Image.Image) -> str:
    """sha1 of an in-memory image's mode, size and pixels, remembered while the image object lives."""
    memo = _PIXEL_DIGESTS.get(id(image))
    if memo is not None and memo[0]() is image:
        return memo[1]
    digest = hashlib.sha1(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    _PIXEL_DIGESTS[id(image)] = (weakref.ref(image), digest.hexdigest())
    return digest.hexdigest()


def shift_key(shifts: Sequence[str], position: int) -> str:
    shift = "+".join(shifts)
    if any(name in INDEX_SEEDED_SHIFTS for name in shifts):
        shift += f"@{position}"
    return shift


@dataclass
class CacheStats:
    fitted: int = 0  # images decoded and fitted (cache misses, or every access with the cache off)
    memory_hits: int = 0
    disk_hits: int = 0
    stale: int = 0  # entries dropped because their file changed
    stored_memory: int = 0
    stored_disk: int = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class ImageCache:
    """location -> (version, pixels) in memory; disk entries at <root>/<fit>/<aa>/<location hash>/<version>.npy."""

    memory: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)
    memory_bytes: int = 0
    stats: CacheStats = field(default_factory=CacheStats)

    def __reduce__(self):
        """Workers started by "spawn" get their own process cache (and the disk), not a pickled copy of the memory."""
        return (_process_cache, ()) if self is IMAGE_CACHE else super().__reduce__()

    def clear(self) -> None:
        self.memory.clear()
        self.memory_bytes = 0
        self.stats = CacheStats()

    def get(self, fit_key: str, location: str, version: str, disk: bool) -> np.ndarray | None:
        """The cached pixels, or None; an entry of another version of the same file is dropped as stale (counted
        once, whether memory, disk or both held it). A disk entry read once is kept in memory within its limit."""
        key = f"{fit_key}|{location}"
        entry = self.memory.get(key)
        stale = entry is not None and entry[0] != version
        if entry is not None and not stale:
            self.stats.memory_hits += 1
            return entry[1]
        if stale:
            self._drop_memory(key, stale=False)
        pixels = self._read_disk(fit_key, location, version) if disk else None
        if pixels is None and disk:
            folder = self.entry_dir(fit_key, location)
            for old in folder.glob("*.npy") if folder.is_dir() else ():  # another version of this file: stale now
                old.unlink(missing_ok=True)
                stale = True
        self.stats.stale += stale
        return pixels

    def _read_disk(self, fit_key: str, location: str, version: str) -> np.ndarray | None:
        path = self.entry_dir(fit_key, location) / f"{_hash(version)}.npy"
        if not path.is_file():
            return None
        try:
            pixels = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:  # a damaged file costs a re-decode, never a wrong image
            logger.warning("image cache: ignoring unreadable %s (%s)", path, error)
            path.unlink(missing_ok=True)
            return None
        self.stats.disk_hits += 1
        if self.memory_bytes + pixels.nbytes <= memory_limit_bytes():  # read once: later epochs from memory
            pixels = np.array(pixels)
            self._keep(f"{fit_key}|{location}", version, pixels)
        return pixels

    def put(self, fit_key: str, location: str, version: str, pixels: np.ndarray, storage: str) -> None:
        """Keep `pixels` in memory, on disk, or both ("shared": on disk for other processes, in memory for this one)."""
        if storage in ("disk", "shared"):
            folder = self.entry_dir(fit_key, location)
            with atomic_path(folder / f"{_hash(version)}.npy") as tmp, open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(pixels))
            self.stats.stored_disk += 1
        if storage in ("memory", "shared"):
            self._keep(f"{fit_key}|{location}", version, pixels)
            self.stats.stored_memory += 1

    def _keep(self, key: str, version: str, pixels: np.ndarray) -> None:
        self._drop_memory(key, stale=False)
        self.memory[key] = (version, pixels)
        self.memory_bytes += pixels.nbytes

    def _drop_memory(self, key: str, stale: bool = True) -> None:
        entry = self.memory.pop(key, None)
        if entry is not None:
            self.memory_bytes -= entry[1].nbytes
            self.stats.stale += stale

    @staticmethod
    def root(fit_key: str) -> Path:
        return cache_dir() / "images" / _hash(fit_key)  # created by the first entry written, not by lookups

    def entry_dir(self, fit_key: str, location: str) -> Path:
        digest = _hash(location)
        return self.root(fit_key) / digest[:2] / digest


IMAGE_CACHE = ImageCache()


def _process_cache() -> ImageCache:
    return IMAGE_CACHE


def choose_storage(mode: str, fit_key: str, missing: int, bytes_per_image: int, cache: ImageCache) -> str | None:
    """Where `missing` new images of about `bytes_per_image` go: "memory", "disk", "shared" (both: a grid worker
    keeps them for itself and for the other workers of its machine), or None (not cached).

    A disk cache that would not fit is refused before anything is written: an error for `data.image_cache: disk`,
    a warning (images decoded every time) for auto.
    """
    if mode == "off" or missing == 0:
        return None
    needed = missing * bytes_per_image
    fits_memory = cache.memory_bytes + needed <= memory_limit_bytes()
    if mode == "memory" or (mode == "auto" and fits_memory and not caches_shared()):
        return "memory"
    root = cache.root(fit_key)
    free = shutil.disk_usage(cache_dir()).free
    if needed * DISK_HEADROOM <= free:
        if mode == "auto" and fits_memory:  # a grid worker: in memory, and on disk for the machine's other workers
            logger.info("image cache: %d images also on disk in %s, shared with the grid's other workers", missing,
                        root)
            return "shared"
        if mode == "auto":
            logger.info("image cache: %d images (%.0f MB) exceed the memory limit (MMPEFT_IMAGE_CACHE_MB=%d): "
                        "cached on disk in %s", missing, needed / 2 ** 20, memory_limit_bytes() // 2 ** 20, root)
        return "disk"
    message = (f"image cache: {missing} images need about {needed / 2 ** 30:.2f} GiB (x{DISK_HEADROOM} headroom) in "
               f"{root}, but only {free / 2 ** 30:.2f} GiB are free; free some space, point MMPEFT_CACHE elsewhere, "
               "or set data.image_cache: memory or off")
    if mode == "disk":
        raise DataError(message)
    logger.warning("%s; decoding images every time instead", message)
    return None


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()
