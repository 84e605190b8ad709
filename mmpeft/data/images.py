"""Every PIL mode to 8-bit RGB in one function (`to_rgb`), so a file means the same pixels wherever it is read.

Why not `image.convert("RGB")`: PIL clips high-bit-depth and float samples instead of scaling them, so a 16-bit PNG
comes out almost white and a float TIFF in [0, 1] black, and it drops transparency onto black. The rules here:

- `I;16` (and `I;16L`, `I;16B`, `I;16N`): 16-bit samples, scaled by the type's range (v * 255 / 65535). The type's
  range, not each image's maximum, so a dark image stays dark and brightness means the same in every image.
- `I` (32-bit int): PIL's mode for 16-bit PGM/PPM and some TIFFs. Values within [0, 65535] are scaled as 16-bit
  samples (as `I;16`); an image with values outside that range is stretched min-max over its own values.
- `F` (32-bit float): values within [0, 1] (the float convention) are scaled by 255; else values within [0, 255]
  (8-bit data stored as float) are kept; else the image is stretched min-max over its own finite values.
  Non-finite values (NaN, infinities) become 0.
- Transparency (`RGBA`, `LA`, `PA`, the premultiplied `RGBa` and `La`, and `P`/`L`/`RGB`/`I;16` with a
  transparency key) is composited on a white background: what a transparent PNG looks like on a page.
- `1`, `L`, `P`, `RGB`, `RGBX`, `CMYK`, `YCbCr`, `LAB`, `HSV`: PIL's own conversion, which is right for these
  (CMYK: r = 255 * (1 - c) * (1 - k); an embedded ICC profile is not applied).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


PIXEL_CAP_HINT = "downscale it or raise data.max_image_pixels (null: no cap)"


def over_pixel_cap(image: Image.Image, max_pixels: int | None) -> str | None:
    """Why an opened image is over data.max_image_pixels, read from its header before any pixel is decoded (a PNG of
    a hundred bytes can claim 12000x12000 pixels: half a gigabyte decoded); None within the cap or with no cap."""
    width, height = image.size
    if max_pixels is None or width * height <= max_pixels:
        return None
    return f"{width}x{height} = {width * height:,} pixels, over data.max_image_pixels = {max_pixels:,}"


def to_rgb(image: Image.Image) -> Image.Image:
    """A new, fully loaded 8-bit RGB image: EXIF rotation applied, high bit depths scaled, transparency flattened."""
    image.load()
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in SIXTEEN_BIT or mode in ("I", "F"):
        return _wide_to_rgb(image)
    if mode == "La":  # premultiplied: PIL converts it only to LA
        image, mode = image.convert("LA"), "LA"
    if mode in ALPHA_MODES or "transparency" in image.info:
        return _flatten(image.convert("RGBA"))
    return image.convert("RGB")  # also copies an RGB image, so the caller's image is never returned


def _flatten(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """`I;16*`, `I` and `F` images: samples mapped to 0..255 by the rules in the module docstring."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        low, high = _finite_range(values)
        if low >= 0 and high <= 1:
            scaled = values * 255.0
        elif low >= 0 and high <= 255:
            scaled = values
        else:
            scaled = _stretch(values, low, high)
        scaled = np.where(np.isfinite(scaled), scaled, 0.0)
    elif image.mode in SIXTEEN_BIT:
        scaled = values * (255.0 / 65535.0)
    else:
        low, high = _finite_range(values)
        scaled = values * (255.0 / 65535.0) if low >= 0 and high <= 65535 else _stretch(values, low, high)
    gray = Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)) and image.mode != "F":  # a grey-level key (16-bit PNG tRNS)
        alpha = np.where(np.asarray(image) == transparent, 0, 255).astype(np.uint8)
        return _flatten(Image.merge("RGBA", (gray, gray, gray, Image.fromarray(alpha))))
    return gray.convert("RGB")


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Min-max to 0..255; a constant image (no range to stretch) is black."""
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))
