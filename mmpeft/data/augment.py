"""Train-time augmentation with PIL only (no torchvision here), driven by a `random.Random` the caller seeds.

The caller derives the generator from (seed, epoch, index), so a resumed run augments exactly as an unbroken one.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageEnhance

from mmpeft.specs import AugmentSpec

RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of random resized crops, as in torchvision


def augment_enabled(spec: AugmentSpec | None) -> bool:
    return spec is not None and (spec.random_resized_crop or spec.horizontal_flip or spec.color_jitter > 0
                                 or spec.affine_degrees > 0 or spec.affine_translate > 0)


def check_augment(spec: AugmentSpec) -> None:
    """Reject settings PIL cannot honour, naming the field (AugmentSpec itself has no checks)."""
    scale = tuple(spec.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"data.augment.crop_scale must be two numbers 0 < low <= high <= 1, got {list(scale)}")
    if spec.color_jitter < 0:
        raise ValueError(f"data.augment.color_jitter must be >= 0, got {spec.color_jitter}")
    if not 0 <= spec.affine_degrees <= 180:
        raise ValueError(f"data.augment.affine_degrees must be in [0, 180], got {spec.affine_degrees}")
    if not 0 <= spec.affine_translate < 1:
        raise ValueError(f"data.augment.affine_translate must be in [0, 1), got {spec.affine_translate}")


def augment(image: Image.Image, spec: AugmentSpec, rng: random.Random) -> Image.Image:
    """Random resized crop (back to the input size), horizontal flip, small affine, colour jitter, in that order."""
    if spec.random_resized_crop:
        image = random_resized_crop(image, spec.crop_scale, rng)
    if spec.horizontal_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if spec.affine_degrees > 0 or spec.affine_translate > 0:
        image = random_affine(image, spec.affine_degrees, spec.affine_translate, rng)
    if spec.color_jitter > 0:
        image = color_jitter(image, spec.color_jitter, rng)
    return image


def random_resized_crop(image: Image.Image, scale: tuple[float, ...], rng: random.Random) -> Image.Image:
    """Crop a random area fraction in `scale` with a random aspect ratio, resized back to the original size."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            break
    else:  # no crop fitted (extreme aspect ratio): the largest centred crop within the ratio range
        w, h = width, height
        if width / height > RATIO[1]:
            w = round(height * RATIO[1])
        elif width / height < RATIO[0]:
            h = round(width / RATIO[0])
        left, top = (width - w) // 2, (height - h) // 2
    return image.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def random_affine(image: Image.Image, degrees: float, translate: float, rng: random.Random) -> Image.Image:
    """Rotate by up to `degrees` and shift by up to `translate` of the size; uncovered pixels are black."""
    angle = rng.uniform(-degrees, degrees)
    width, height = image.size
    dx = rng.uniform(-translate, translate) * width
    dy = rng.uniform(-translate, translate) * height
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy))


def color_jitter(image: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor drawn from [1 - s, 1 + s] (at least 0)."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        factor = rng.uniform(max(0.0, 1 - strength), 1 + strength)
        image = enhancer(image).enhance(factor)
    return image
