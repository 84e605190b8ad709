"""Stratified train/val/test splits and the nested k-shot sampler, both fixed by the seed alone.

Splits are made over distinct images, not rows: when several captions share an image, all of them land in the
same split, so no test image is ever seen in training.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from mmpeft.data.errors import DataError
from mmpeft.data.sources import DatasetImage, ShardImage
from mmpeft.specs import SplitSpec

E = TypeVar("E")  # anything with `.label` (an int) and `.image`


def split_examples(examples: Sequence[E], split: SplitSpec, seed: int,
                   names: Sequence[str] | None = None) -> tuple[list[E], list[E], list[E]]:
    """(train, val, test) stratified by label; each keeps the input order; val is empty when `split.val` is 0."""
    from sklearn.model_selection import train_test_split

    groups = _image_groups(examples)
    group_ids = np.arange(len(groups))
    group_labels = np.array([examples[members[0]].label for members in groups])
    try:
        rest, test = train_test_split(group_ids, test_size=split.test, random_state=seed, stratify=group_labels)
        val: np.ndarray = np.array([], dtype=int)
        if split.val > 0:
            rest, val = train_test_split(rest, test_size=split.val / (1 - split.test), random_state=seed,
                                         stratify=group_labels[rest])
    except ValueError as error:
        counts = Counter(group_labels.tolist())
        shown = ", ".join(f"{_name(c, names)} {n}" for c, n in sorted(counts.items(), key=lambda kv: kv[1])[:10])
        raise DataError(f"cannot split {len(groups)} images into {len(counts)} classes with data.split "
                        f"val={split.val}, test={split.test} stratified by class ({error}). Smallest classes: "
                        f"{shown}. Every class needs enough images for each split: add images, drop rare "
                        "classes (data.classes) or change data.split") from None

    def pick(ids: np.ndarray) -> list[E]:
        return [examples[i] for i in sorted(i for g in ids.tolist() for i in groups[g])]

    return pick(rest), pick(val), pick(test)


def k_shot(examples: Sequence[E], k: int, seed: int, names: Sequence[str] | None = None) -> list[E]:
    """k examples per class, in input order. Nested: for one seed, the k-sample contains every smaller k's sample.

    Each class is shuffled once by (seed, class) and its first k are taken, so adding shots only adds examples.
    """
    if k < 1:
        raise DataError(f"data.shots must be >= 1, got {k}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for label in range(len(names or ())):  # with names known, a class absent from `examples` counts as 0
        by_class[label] = []
    for i, example in enumerate(examples):
        by_class[example.label].append(i)
    short = {c: len(members) for c, members in by_class.items() if len(members) < k}
    if short:
        shown = ", ".join(f"{_name(c, names)} has {n}" for c, n in sorted(short.items()))
        raise DataError(f"data.shots={k}: {len(short)} class(es) have fewer than {k} training examples "
                        f"({shown}). Lower data.shots or give those classes more data")
    chosen = []
    for label in sorted(by_class):
        order = np.random.default_rng([seed, label]).permutation(len(by_class[label]))
        chosen += [by_class[label][j] for j in order[:k]]
    return [examples[i] for i in sorted(chosen)]


def examples_fingerprint(examples: Sequence[E]) -> str:
    """A short hash of which examples (image reference and label, in order) a split holds.

    Why: a compare grid checks from each cell's metrics that its cells really shared one test split and, per seed
    and k, one training sample. In-memory images are identified by object id, so compare those within one process.
    """
    digest = hashlib.sha1()
    for example in examples:
        image = example.image
        referenced = isinstance(image, (DatasetImage, ShardImage))
        ref = image if isinstance(image, str) else repr(image) if referenced else f"id:{id(image)}"
        digest.update(f"{ref}\t{example.label}\n".encode())
    return digest.hexdigest()[:12]


def _image_groups(examples: Sequence[E]) -> list[list[int]]:
    """Indices of examples grouped by image (a path, or the identity of an in-memory image), first-seen order."""
    groups: dict[object, list[int]] = {}
    for i, example in enumerate(examples):
        image = example.image
        key = (image or ("row", i)) if isinstance(image, str) else ("id", id(image))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _name(label: int, names: Sequence[str] | None) -> str:
    return repr(names[label]) if names is not None and 0 <= label < len(names) else f"class {label}"
