"""Named image shifts (rotations, inversion, noise, ...) for robustness tests: each is deterministic per example.

`SHIFTS` is the one list of names; recipes compose them with "+" ("rot90+invert"), applied left to right.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from mmpeft.data.images import to_rgb

NOISE_STD = 0.15  # gaussian noise std as a fraction of the pixel range


def _noise(image: Image.Image, index: int) -> Image.Image:
    """Gaussian noise seeded by the example's index, so every run sees the same noisy image."""
    rng = np.random.default_rng([abs(int(index)), 0x5EED])
    pixels = np.asarray(image, dtype=np.float32)
    noisy = pixels + rng.normal(0.0, NOISE_STD * 255.0, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.rint(noisy).clip(0, 255).astype(np.uint8))


SHIFTS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "none": lambda image, index: image,
    "rot90": lambda image, index: image.transpose(Image.Transpose.ROTATE_90),  # counter-clockwise
    "rot180": lambda image, index: image.transpose(Image.Transpose.ROTATE_180),
    "rot270": lambda image, index: image.transpose(Image.Transpose.ROTATE_270),
    "invert": lambda image, index: ImageOps.invert(image),
    "hflip": lambda image, index: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "noise": _noise,
    "blur": lambda image, index: image.filter(ImageFilter.GaussianBlur(radius=1)),
}


def parse_shift(text: str | Iterable[str]) -> tuple[str, ...]:
    """"rot90+invert" (or a list of such strings) -> ("rot90", "invert"); an unknown name is a ValueError."""
    parts = [text] if isinstance(text, str) else list(text)
    names = tuple(name.strip() for part in parts for name in str(part).split("+") if name.strip())
    for name in names:
        if name not in SHIFTS:
            close = difflib.get_close_matches(name, list(SHIFTS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown image shift {name!r}{hint}; valid shifts: {', '.join(SHIFTS)}")
    return names


def apply_shifts(image: Image.Image, shifts: str | Iterable[str], index: int) -> Image.Image:
    """Apply `shifts` in order to an image (converted to RGB by `to_rgb`); `index` seeds the random ones."""
    image = image if image.mode == "RGB" else to_rgb(image)
    for name in parse_shift(shifts):
        image = SHIFTS[name](image, index)
    return image


def shift_label(shifts: Iterable[str]) -> str:
    """The display name of a composed shift ("rot90+invert"; "none" for no shift), for tables and reports."""
    names = [name for name in shifts if name != "none"]
    return "+".join(names) or "none"
