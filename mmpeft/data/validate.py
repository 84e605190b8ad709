"""Bad rows, found before any model loads: missing, corrupt or oversized images, labels outside the class list, empty
classes.

All bad rows are gathered first and reported together (count + the first few, each with its reason), so one run
shows the user everything to fix; `data.on_bad_rows: skip` drops them with a warning instead.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from mmpeft.core.schema import did_you_mean
from mmpeft.data.errors import DataError
from mmpeft.data.images import PIXEL_CAP_HINT, over_pixel_cap
from mmpeft.data.sources import DatasetImage, Row, ShardImage

logger = logging.getLogger("mmpeft")
SHOWN = 5  # bad rows quoted in a message
KIND_NAMES = {"read": "unusable as read", "missing": "image not found", "corrupt": "unreadable image",
              "large": "image too large", "label": "bad label", "length": "too long to fit"}
Kind = Literal["read", "missing", "corrupt", "large", "label", "length"]
ImageProblem = tuple[Kind, str] | None  # (kind, detail) of an image, None when it is usable


@dataclass(frozen=True)
class BadRow:
    source: str
    kind: Kind
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


def find_bad_rows(rows: Sequence[Row], classes: Sequence[str] | None, max_pixels: int | None,
                  labelled: bool = True) -> tuple[list[Row], list[BadRow]]:
    """Split rows into good ones and bad ones (each image is checked once, in threads; see `check_image`).

    `max_pixels` is `data.max_image_pixels`: images with more pixels are bad rows (None: no cap of ours).
    `labelled` False: caption-only rows, which need no label (their readers refuse rows without a caption).
    """
    checks = _check_images(rows, max_pixels)
    allowed = set(classes) if classes is not None else None
    good, bad = [], []
    for row in rows:
        problem = _row_problem(row, allowed, classes, checks)
        if not labelled and problem is not None and problem == ("label", "no label"):
            problem = None
        if problem is None:
            good.append(row)
        else:
            bad.append(BadRow(row.source, *problem))
    return good, bad


def report_bad_rows(bad: Sequence[BadRow], where: str, on_bad_rows: Literal["error", "skip"]) -> None:
    """Raise DataError (`error`) or log one warning (`skip`) naming the count, the kinds and the first rows."""
    if not bad:
        return
    shown = "; ".join(str(b) for b in bad[:SHOWN]) + (f"; ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
    noun = "bad row" if len(bad) == 1 else "bad rows"
    if on_bad_rows == "error":
        raise DataError(f"{len(bad)} {noun} in {where}: {shown}. Fix them or set data.on_bad_rows: skip")
    kinds = ", ".join(f"{n} {KIND_NAMES[kind]}" for kind, n in Counter(b.kind for b in bad).items())
    logger.warning("skipped %d %s in %s (%s): %s", len(bad), noun, where, kinds, shown)


def check_empty_classes(classes: Sequence[str], labels: Iterable[str], where: str, skipped: int) -> None:
    """A class listed in `data.classes` with no usable row is always an error: it could never be learned."""
    counts = Counter(labels)
    empty = [c for c in classes if counts[c] == 0]
    if empty:
        after = f" (after skipping {skipped} bad rows)" if skipped else ""
        raise DataError(f"{len(empty)} empty class(es) in {where}{after}: {', '.join(map(repr, empty))} "
                        "listed in data.classes but no row has that label. Add rows or remove them from data.classes")


def check_image(open_image: Callable[[], Image.Image], max_pixels: int | None) -> ImageProblem:
    """None if the image is usable; else ("missing" | "large" | "corrupt", detail).

    The size is read from the header and checked against `max_pixels` before any pixel is decoded: a PNG of a hundred
    bytes can claim 12000x12000 pixels and decode to half a gigabyte. Then the data is checked: `Image.verify()`
    checks only PNGs (every chunk's checksum, through the end chunk, so a cut or damaged file fails) and reads
    nothing of the other formats, so a truncated JPEG passed it and failed at zero-shot or in the first epoch.
    PNGs are verified (a tenth of the cost of decoding); every other format is decoded in full, JPEGs in draft mode
    (scaled 1/8 inside the decoder: all the compressed data is still read, at a fraction of the cost).
    """
    try:
        with open_image() as image:
            if detail := over_pixel_cap(image, max_pixels):
                return "large", detail
            if image.format == "PNG":
                image.verify()
                return None
            if image.format == "JPEG":
                image.draft(image.mode, (1, 1))
            image.load()
    except FileNotFoundError as error:  # a `datasets` row whose file has gone
        return "missing", str(error)
    except Image.DecompressionBombError as error:  # over PIL's own limit, which applies even with no cap of ours
        return "large", str(error)
    except Exception as error:  # PIL raises many types for damaged files; each is "corrupt" here
        return "corrupt", f"{type(error).__name__}: {error}"
    return None


def _check_path(path: str, max_pixels: int | None) -> ImageProblem:
    if not os.path.isfile(path):
        return "missing", ""
    return check_image(lambda: Image.open(path), max_pixels)


def _check_chunk(paths: list[str], max_pixels: int | None) -> list[ImageProblem]:
    return [_check_path(p, max_pixels) for p in paths]


def _check_images(rows: Sequence[Row], max_pixels: int | None) -> dict[object, ImageProblem]:
    """Check every distinct image once (captions often share an image); results keyed by path or ref id."""
    paths = sorted({row.image for row in rows if row.problem is None and isinstance(row.image, str)})
    refs = [row.image for row in rows if row.problem is None and isinstance(row.image, (DatasetImage, ShardImage))]
    results: dict[object, ImageProblem] = {}
    if len(paths) > 512:  # threads in chunks: PIL decodes without the GIL, and network storage waits in parallel
        chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
        with ThreadPoolExecutor(4) as pool:
            for chunk, found in zip(chunks, pool.map(_check_chunk, chunks, [max_pixels] * len(chunks))):
                results.update(zip(chunk, found))
    else:
        results.update((p, _check_path(p, max_pixels)) for p in paths)
    results.update((id(ref), check_image(ref.open, max_pixels)) for ref in refs)
    return results


def backslash_hint(name: str) -> str:
    """For a path written on Windows (`images\\cat.png`), which names no file here: say to use `/`."""
    return "; it is written with backslashes: write paths with / (images/cat.png)" if "\\" in name else ""


def _row_problem(row: Row, allowed: set[str] | None, classes: Sequence[str] | None,
                 checks: dict[object, ImageProblem]) -> tuple[Kind, str] | None:
    if row.problem is not None:
        return "read", row.problem
    status = checks.get(row.image if isinstance(row.image, str) else id(row.image))
    if status is not None:
        kind, detail = status
        image = f"image {row.image!r}" if isinstance(row.image, str) else "image"
        if kind == "missing" and isinstance(row.image, str):
            folder, name = os.path.split(row.image)
            return "missing", f"image {name!r} not found under {folder}{backslash_hint(name)}"
        if kind == "missing":
            return "missing", f"image not found ({detail})"
        if kind == "large":
            return "large", f"{image} is too large ({detail}): {PIXEL_CAP_HINT}"
        return "corrupt", f"{image} is unreadable ({detail})"
    if row.label is None:
        return "label", "no label"
    if allowed is not None and row.label not in allowed:
        listed = ", ".join(classes or [])
        return "label", f"label {row.label!r} not in classes [{listed}]{did_you_mean(row.label, classes or [])}"
    return None
