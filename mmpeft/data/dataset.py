"""Examples and the torch Dataset over them: images are read lazily, shifted, and augmented reproducibly.

Augmentation randomness comes from (seed, epoch, index) only, never from a global generator or worker state,
so the same epoch of a resumed run sees exactly the same images as an unbroken run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mmpeft.data.augment import augment, augment_enabled, check_augment
from mmpeft.data.shifts import apply_shifts, parse_shift
from mmpeft.data.sources import ImageRef, load_image
from mmpeft.specs import AugmentSpec

Preprocess = Callable[[list[Image.Image]], torch.Tensor]


@dataclass(frozen=True)
class Example:
    """One usable example: an image reference (a path until used), its class int, an optional caption."""

    image: ImageRef
    label: int
    text: str | None = None
    prompt: str | None = None  # the row's own question (generative backbones); None: the recipe's data.question


class ImageDataset(torch.utils.data.Dataset):
    """Items {"image": PIL RGB, "label": int, "index": int, ["text": str]}; shifts always, augmentation if given.

    With DataLoader workers, call `set_epoch` before creating each epoch's iterator (non-persistent workers
    receive a fresh copy of the dataset then; persistent workers would keep the old epoch).
    """

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

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        image = apply_shifts(load_image(example.image), self.shifts, index)
        if self.augment is not None:
            image = augment(image, self.augment, self.rng(index))
        item: dict[str, Any] = {"image": image, "label": example.label, "index": index}
        if example.text is not None:
            item["text"] = example.text
        if example.prompt is not None:
            item["prompt"] = example.prompt
        return item

    def rng(self, index: int) -> random.Random:
        """The augmentation generator of one item: a function of (seed, epoch, index) alone."""
        return random.Random(f"mmpeft-augment:{self.seed}:{self.epoch}:{index}")

    @property
    def labels(self) -> list[int]:
        return [example.label for example in self.examples]


def collate_images(preprocess: Preprocess) -> "ImageCollator":
    """A DataLoader collate_fn: images through the backbone's `preprocess`, labels and indices as LongTensors."""
    return ImageCollator(preprocess)


class ImageCollator:
    """The collate function as a class, not a closure, so DataLoader workers started by "spawn" can pickle it."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "pixel_values": self.preprocess([item["image"] for item in items]),
            "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        }
        if any("text" in item for item in items):
            batch["texts"] = [item.get("text") for item in items]
        if any("prompt" in item for item in items):
            batch["prompts"] = [item.get("prompt") for item in items]
        return batch
