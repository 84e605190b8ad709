"""Examples and the torch Dataset over them: images are read lazily, shifted, and augmented reproducibly.

Augmentation randomness comes from (seed, epoch, index) only, never from a global generator or worker state,
so the same epoch of a resumed run sees exactly the same images as an unbroken run, whatever the worker count.
A dataset bound to a backbone (`fitted`) reads its images through the decoded-image cache (data/image_cache.py).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmpeft.data.augment import augment, augment_enabled, check_augment
from mmpeft.data.image_cache import IMAGE_CACHE, ImageCache, ImageFitter, image_identity, shift_key
from mmpeft.data.shifts import apply_shifts, parse_shift
from mmpeft.data.sources import ImageRef, load_image
from mmpeft.specs import AugmentSpec

Preprocess = Callable[[list[Image.Image]], torch.Tensor]
PreprocessFitted = Callable[[list[np.ndarray]], Any]


@dataclass(frozen=True)
class Example:
    """One usable example: an image reference (a path until used), its class int, an optional caption."""

    image: ImageRef
    label: int
    text: str | None = None
    prompt: str | None = None  # the row's own question (generative backbones); None: the recipe's data.question


class FittedImages:
    """A dataset's images as one backbone's processor wants them, read through the cache (or fitted every time)."""

    def __init__(self, fitter: ImageFitter, room: bool, mode: str, cache: ImageCache = IMAGE_CACHE):
        self.fitter, self.room, self.mode, self.cache = fitter, room, mode, cache
        self.key = fitter.image_fit_key(room)
        self.disk = mode in ("auto", "disk")  # where entries may already be (an earlier process, a larger set)

    def entry(self, example: Example, position: int, shifts: Sequence[str]) -> tuple[str, str]:
        where, version = image_identity(example.image)
        return f"{where}|{shift_key(shifts, position)}", version

    def cached(self, example: Example, position: int, shifts: Sequence[str]) -> np.ndarray | None:
        if self.mode == "off":
            return None
        return self.cache.get(self.key, *self.entry(example, position, shifts), disk=self.disk)

    def fit(self, example: Example, position: int, shifts: Sequence[str]) -> np.ndarray:
        return self.fitter.fit_image(apply_shifts(load_image(example.image), shifts, position), self.room)

    def load(self, example: Example, position: int, shifts: Sequence[str]) -> np.ndarray:
        pixels = self.cached(example, position, shifts)
        if pixels is None:
            self.cache.stats.fitted += 1  # counted in this process (a worker's counts stay in the worker)
            pixels = self.fit(example, position, shifts)
        return pixels


class ImageDataset(torch.utils.data.Dataset):
    """Items {"image": PIL RGB, "label": int, "index": int, ["text": str]}; shifts always, augmentation if given.

    A `fitted` copy gives "pixels" (uint8 at the processor's input size) instead of "image". An item may be asked
    for by index or by (epoch, index): the latter lets persistent DataLoader workers serve every epoch. Otherwise,
    call `set_epoch` before creating each epoch's iterator.
    """

    accepts_epoch_keys = True
    images: FittedImages | None = None

    def __init__(self, examples: Sequence[Example], shifts: str | Sequence[str] = (),
                 augment: AugmentSpec | None = None, seed: int = 0):
        self.examples = list(examples)
        self.shifts = parse_shift(shifts)
        if augment is not None:
            check_augment(augment)
        self.augment = augment if augment_enabled(augment) else None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.examples)

    def fitted(self, fitter: ImageFitter, mode: str, cache: ImageCache = IMAGE_CACHE) -> ImageDataset:
        """A copy whose images come fitted to `fitter` through the decoded-image cache (`mode` "off": uncached).

        With augmentation the cache keeps a slightly larger base image (room to crop), augments it, and fits the
        result; without, the cached image is the processor's input itself.
        """
        bound = copy.copy(self)
        bound.images = FittedImages(fitter, self.augment is not None, mode, cache)
        return bound

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        example = self.examples[index]
        item: dict[str, Any] = {"label": example.label, "index": index}
        if self.images is None:
            image = apply_shifts(load_image(example.image), self.shifts, index)
            item["image"] = image if self.augment is None else augment(image, self.augment, self.rng(index, epoch))
        elif self.augment is None:
            item["pixels"] = self.images.load(example, index, self.shifts)
        else:
            base = Image.fromarray(np.asarray(self.images.load(example, index, self.shifts)))
            item["pixels"] = self.images.fitter.fit_image(augment(base, self.augment, self.rng(index, epoch)), False)
        if example.text is not None:
            item["text"] = example.text
        if example.prompt is not None:
            item["prompt"] = example.prompt
        return item

    def rng(self, index: int, epoch: int | None = None) -> random.Random:
        """The augmentation generator of one item: a function of (seed, epoch, index) alone."""
        return random.Random(f"mmpeft-augment:{self.seed}:{self.epoch if epoch is None else epoch}:{index}")

    @property
    def labels(self) -> list[int]:
        return [example.label for example in self.examples]


def collate_images(preprocess: Preprocess, preprocess_fitted: PreprocessFitted | None = None) -> "ImageCollator":
    """A DataLoader collate_fn: images through the backbone's `preprocess` (fitted pixels through
    `preprocess_fitted`), labels and indices as LongTensors."""
    return ImageCollator(preprocess, preprocess_fitted)


class ImageCollator:
    """The collate function as a class, not a closure, so DataLoader workers started by "spawn" can pickle it."""

    def __init__(self, preprocess: Preprocess, preprocess_fitted: PreprocessFitted | None = None):
        self.preprocess, self.preprocess_fitted = preprocess, preprocess_fitted

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if "pixels" in items[0]:
            if self.preprocess_fitted is None:
                raise ValueError("items carry fitted pixels: build the collate with the backbone's preprocess_fitted")
            pixel_values = self.preprocess_fitted([item["pixels"] for item in items])
        else:
            pixel_values = self.preprocess([item["image"] for item in items])
        batch: dict[str, Any] = {
            "pixel_values": pixel_values,
            "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        }
        if any("text" in item for item in items):
            batch["texts"] = [item.get("text") for item in items]
        if any("prompt" in item for item in items):
            batch["prompts"] = [item.get("prompt") for item in items]
        return batch
