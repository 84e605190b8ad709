"""Bad rows, found before any model loads: missing or corrupt images, labels outside the class list, empty classes.

All bad rows are gathered first and reported together (count + the first few, each with its reason), so one run
shows the user everything to fix; `data.on_bad_rows: skip` drops them with a warning instead.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from mmpeft.core.schema import did_you_mean
from mmpeft.data.errors import DataError
from mmpeft.data.sources import DatasetImage, Row, ShardImage

logger = logging.getLogger("mmpeft")
SHOWN = 5  # bad rows quoted in a message
KIND_NAMES = {"read": "unusable as read", "missing": "image not found", "corrupt": "unreadable image",
              "label": "bad label"}


@dataclass(frozen=True)
class BadRow:
    source: str
    kind: Literal["read", "missing", "corrupt", "label"]
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


def find_bad_rows(rows: Sequence[Row], classes: Sequence[str] | None, labelled: bool = True,
                  ) -> tuple[list[Row], list[BadRow]]:
    """Split rows into good ones and bad ones (each image file is opened and verified once, in threads).
    `labelled` False: caption-only rows, which need no label (their readers refuse rows without a caption)."""
    checks = _check_images(rows)
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


def verify_image(path: str) -> str | None:
    """None if `path` opens and verifies as an image, else the reason (for the row's message)."""
    if not os.path.isfile(path):
        return "missing"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for damaged files; each is "corrupt" here
        return f"corrupt: {type(error).__name__}: {error}"
    return None


def _verify_chunk(paths: list[str]) -> list[str | None]:
    return [verify_image(p) for p in paths]


def _verify_dataset_image(ref: DatasetImage | ShardImage) -> str | None:
    try:
        with ref.open() as image:
            image.verify()
    except Exception as error:
        return f"corrupt: {type(error).__name__}: {error}"
    return None


def _check_images(rows: Sequence[Row]) -> dict[object, str | None]:
    """Verify every distinct image once (captions often share an image); results keyed by path or ref id."""
    paths = sorted({row.image for row in rows if row.problem is None and isinstance(row.image, str)})
    refs = [row.image for row in rows if row.problem is None and isinstance(row.image, (DatasetImage, ShardImage))]
    results: dict[object, str | None] = {}
    if len(paths) > 512:  # threads in chunks: free on a local disk, a large win on network storage
        chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
        with ThreadPoolExecutor(4) as pool:
            for chunk, found in zip(chunks, pool.map(_verify_chunk, chunks)):
                results.update(zip(chunk, found))
    else:
        results.update((p, verify_image(p)) for p in paths)
    results.update((id(ref), _verify_dataset_image(ref)) for ref in refs)
    return results


def _row_problem(row: Row, allowed: set[str] | None, classes: Sequence[str] | None,
                 checks: dict[object, str | None]) -> tuple[str, str] | None:
    if row.problem is not None:
        return "read", row.problem
    if isinstance(row.image, str):
        status = checks[row.image]
        if status == "missing":
            folder, name = os.path.split(row.image)
            return "missing", f"image {name!r} not found under {folder}"
        if status is not None:
            return "corrupt", f"image {row.image!r} is unreadable ({status.removeprefix('corrupt: ')})"
    elif isinstance(row.image, (DatasetImage, ShardImage)) and checks[id(row.image)] is not None:
        return "corrupt", f"image is unreadable ({checks[id(row.image)].removeprefix('corrupt: ')})"
    if row.label is None:
        return "label", "no label"
    if allowed is not None and row.label not in allowed:
        listed = ", ".join(classes or [])
        return "label", f"label {row.label!r} not in classes [{listed}]{did_you_mean(row.label, classes or [])}"
    return None
