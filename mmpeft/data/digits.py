"""scikit-learn's 1,797 real 8x8 digit scans as an image folder in the cache: a dataset that needs no download.

Built once, on first use, in a temporary folder that is renamed into place, so two runs racing to build it (or
a run killed half-way) never leave a partial folder that a later run would trust.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DIGIT_NAMES = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four",
               "5": "five", "6": "six", "7": "seven", "8": "eight", "9": "nine"}
READY = ".complete"  # written last inside the temporary folder: a folder that has it is whole


def digits_dir() -> Path:
    from mmpeft.io import cache_dir

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
