"""Conversation data as one call (`load_conversations`): read the tool's files, check every row, split by row.

Conversations have no labels, so splits are by row (seeded, `data.split`), not stratified; `labels` is an empty
label set that methods which need classes refuse on their own.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpeft.data.conversation_files import read_conversations
from mmpeft.data.conversations import LLAVA, MESSAGES, SHAREGPT, Conversation, find_bad_conversations
from mmpeft.data.errors import DataError
from mmpeft.data.labels import LabelSet
from mmpeft.data.llamafactory import alpaca_conversation, read_entry
from mmpeft.data.sources import load_image
from mmpeft.data.validate import report_bad_rows
from mmpeft.specs import DataSpec, SplitSpec

CONVERSATION_SOURCES = ("llava", "sharegpt", "messages", "llamafactory")
FORMATS = {"llava": LLAVA, "sharegpt": SHAREGPT, "messages": MESSAGES}


def conversation_spec_problems(spec: DataSpec) -> list[str]:
    """Keys of labelled data that mean nothing for conversations: refused rather than silently ignored."""
    if spec.source not in CONVERSATION_SOURCES:
        return [f"data.name: {spec.name!r} names a dataset_info.json entry; it applies to data.source: llamafactory"
                ] if spec.name is not None else []
    problems = []
    defaults = DataSpec(source="llava", path=".")
    for key in ("classes", "label_names", "label_prompts", "shots", "subset"):
        if getattr(spec, key) is not None:
            problems.append(f"data.{key}: conversations have no labels; remove it for data.source: {spec.source}")
    for key in ("shift", "eval_shifts"):
        if getattr(spec, key):
            problems.append(f"data.{key}: image shifts are not applied to conversations; remove it")
    if spec.image_column != defaults.image_column:  # a dataset's own image column name is not read from it
        problems.append(f"data.image_column: conversation rows keep their images where their format does ('image' in "
                        "LLaVA-Instruct, 'images' in ShareGPT and messages; llamafactory: the entry's columns); "
                        f"remove it for data.source: {spec.source}")
    for key in ("label_column", "text_column", "prompt_column", "templates", "separator"):
        if getattr(spec, key) != getattr(defaults, key):
            problems.append(f"data.{key}: applies to labelled and caption data, not conversations (their turns hold "
                            f"the text); remove it for data.source: {spec.source}")
    if spec.augment != defaults.augment:
        problems.append("data.augment: augmentation is not applied to conversations; remove it")
    if spec.source == "llamafactory" and spec.name is None:
        problems.append("data.name: required for data.source: llamafactory (the entry of dataset_info.json)")
    return problems


@dataclass
class ConversationSplits:
    """The conversations of each split and facts for the run's report (the counterpart of DataSplits)."""

    train: list[Conversation]
    val: list[Conversation]
    test: list[Conversation]
    info: dict[str, Any] = field(default_factory=dict)
    labels: LabelSet = field(default_factory=lambda: LabelSet([]))

    def dataset(self, split: str) -> ConversationDataset:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return ConversationDataset(getattr(self, split))


def read_source(spec: DataSpec) -> tuple[list[Conversation], str]:
    """Every row of `data.path` as the source's tool writes it, and where it came from (for messages)."""
    path = Path(str(spec.path))
    if spec.source != "llamafactory":
        return read_conversations(path, FORMATS[spec.source], spec.image_root, spec.hf_split), str(path)
    entry = read_entry(path, spec.name)
    root = spec.image_root or str(path.parent)  # LLaMA-Factory resolves media against the dataset_dir
    where = f"{entry.file} (entry {entry.name!r} of {path})"
    if entry.formatting == "sharegpt":
        return read_conversations(entry.file, entry.sharegpt_format(), root, entry.split), where
    images = dataclasses.replace(SHAREGPT, images_key=entry.columns.get("images"))  # only where the entry maps it
    parse = partial(alpaca_conversation, entry=entry)
    return read_conversations(entry.file, images, root, entry.split, parse=parse), where


def load_conversations(spec: DataSpec, seed: int) -> ConversationSplits:
    """Read, check (all rows, before any model loads) and split; raises DataError with what to fix."""
    problems = conversation_spec_problems(spec)
    if problems:
        raise DataError("; ".join(problems))
    conversations, where = read_source(spec)
    if not conversations:
        raise DataError(f"no rows found in {where} (data.source: {spec.source})")
    good, bad = find_bad_conversations(conversations, spec.max_image_pixels)
    report_bad_rows(bad, where, spec.on_bad_rows)
    if not good:
        raise DataError(f"no usable rows in {where}: all {len(bad)} rows are bad")
    split_seed = spec.split.seed if spec.split.seed is not None else seed
    train, val, test = split_rows(good, spec.split, split_seed, where)
    info = {
        "source": spec.source, "where": where, "seed": seed, "split_seed": split_seed,
        "counts": {"train": len(train), "val": len(val), "test": len(test)},
        "turns": {"assistant": sum(t.role == "assistant" for c in good for t in c.turns),
                  "max_per_row": max(len(c.turns) for c in good)},
        "images": {"total": sum(len(c.images) for c in good), "max_per_row": max(len(c.images) for c in good),
                   "text_only_rows": sum(not c.images for c in good)},
        "fingerprints": {"train": fingerprint(train), "val": fingerprint(val), "test": fingerprint(test)},
        "skipped": len(bad), "skipped_rows": [str(b) for b in bad[:100]],
    }
    return ConversationSplits(train, val, test, info)


def split_rows(rows: list[Conversation], split: SplitSpec, seed: int, where: str,
               ) -> tuple[list[Conversation], list[Conversation], list[Conversation]]:
    """Seeded split by row (each split keeps file order); every split asked for gets at least one row."""
    n = len(rows)
    n_test = max(1, round(n * split.test))
    n_val = max(1, round(n * split.val)) if split.val > 0 else 0
    if n - n_test - n_val < 1:
        raise DataError(f"cannot split {n} usable rows of {where} into train/val/test with data.split "
                        f"val={split.val}, test={split.test}: it needs at least {n_test + n_val + 1} rows")
    order = np.random.default_rng(seed).permutation(n).tolist()
    test, val = sorted(order[:n_test]), sorted(order[n_test:n_test + n_val])
    train = sorted(order[n_test + n_val:])
    return [rows[i] for i in train], [rows[i] for i in val], [rows[i] for i in test]


def fingerprint(rows: list[Conversation]) -> str:
    digest = hashlib.sha1()
    for row in rows:
        digest.update(f"{row.source}\t{[(t.role, t.text) for t in row.turns]}\n".encode())
    return digest.hexdigest()[:12]


class ConversationDataset(torch.utils.data.Dataset):
    """Items {"turns", "images" (PIL RGB, in order), "index"}; `collate` keeps them as lists (the backbone encodes)."""

    def __init__(self, conversations: list[Conversation]):
        self.conversations = list(conversations)

    def set_epoch(self, epoch: int) -> None:
        """Nothing varies by epoch (no augmentation); kept for the training loop."""

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        conversation = self.conversations[index]
        return {"turns": conversation.turns, "images": [load_image(ref) for ref in conversation.images],
                "index": index}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"turns": [item["turns"] for item in items], "images": [item["images"] for item in items],
                "index": torch.tensor([item["index"] for item in items], dtype=torch.long)}
