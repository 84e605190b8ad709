"""scikit-learn's 1,797 real 8x8 digit scans as an image folder in the cache: a dataset that needs no download.

Built once, on first use, in a temporary folder that is renamed into place, so two runs racing to build it (or
a run killed half-way) never leave a partial folder that a later run would trust.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

E = TypeVar("E")  # anything with `.label`

DIGIT_NAMES = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four",
               "5": "five", "6": "six", "7": "seven", "8": "eight", "9": "nine"}
READY = ".complete"  # written last inside the temporary folder: a folder that has it is whole
# `data.subset`: a fixed stratified partition of the 1,797 digits, independent of every recipe's seed, so the
# demo backbone pre-trains on one part (1,078 images) and downstream recipes never test on an image it has seen.
PRETRAIN_FRACTION = 0.6
PARTITION_SEED = 20_240_917


def digits_dir() -> Path:
    from mmpeft.core.io import cache_dir

    return cache_dir("datasets") / "digits"


def prepare_digits() -> Path:
    """Return the digits image folder, building it if this is the first use."""
    target = digits_dir()
    if (target / READY).is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=target.parent))
    try:
        _write_digits(tmp)
        if target.exists() and not (target / READY).is_file():
            _discard(target)  # left by something other than this code (a rename is all or nothing)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / READY).is_file():  # not a lost race with another builder: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def partition_digits(examples: Sequence[E]) -> tuple[list[E], list[E]]:
    """(pre-training part, held-out part) of the digits, stratified by class, each in input order.

    The partition depends only on the examples' order and labels (the digits folder is read in sorted order), never
    on a recipe's seed: every run agrees on which images the demo backbone has seen.
    """
    from sklearn.model_selection import train_test_split

    labels = [example.label for example in examples]
    pretrain, heldout = train_test_split(list(range(len(examples))), train_size=PRETRAIN_FRACTION,
                                         random_state=PARTITION_SEED, stratify=labels)
    return [examples[i] for i in sorted(pretrain)], [examples[i] for i in sorted(heldout)]


def _write_digits(folder: Path) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    for label in range(10):
        (folder / str(label)).mkdir()
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        Image.fromarray(image).save(folder / str(int(label)) / f"{index:04d}.png")
    (folder / READY).write_text(f"{len(pixels)} images from sklearn.datasets.load_digits\n")


def _discard(folder: Path) -> None:
    aside = Path(tempfile.mkdtemp(prefix=".digits-old-", dir=folder.parent))
    try:
        os.replace(folder, aside / "old")
    except OSError:
        return  # someone else moved it first
    finally:
        shutil.rmtree(aside, ignore_errors=True)
