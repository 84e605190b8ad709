"""Label-text scoring of a whole split, with class text features computed once (they do not change in eval)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate.utils import gather_object
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from mmpeft.core.distributed import process_state
from mmpeft.data.loader import make_loader

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import LabelSet


@torch.no_grad()
def predict(backbone: Backbone, dataset: Dataset, labels: LabelSet, batch_size: int = 64,
            desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) for every example of `dataset`, each counted once.

    With several processes each scores a disjoint share, padded to equal length (FSDP needs every process to run
    the same forwards), and the shares are gathered and de-duplicated by example index.
    """
    was_training = backbone.training
    backbone.eval()
    text_features = None if backbone.head is not None else backbone.class_text_features(labels)
    state = process_state()
    indices = process_share(len(dataset), state.process_index, state.num_processes)
    loader = make_loader(Subset(dataset, indices), backbone, batch_size=batch_size,
                         collate=getattr(dataset, "collate", None))
    truth, predicted = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None if state.is_main_process else True):
        logits = backbone.logits(batch, text_features)
        truth.extend(batch["labels"].tolist())
        predicted.extend(logits.argmax(-1).cpu().tolist())
    backbone.train(was_training)
    rows = dict(zip(indices, zip(truth, predicted)))
    if state.num_processes > 1:
        rows = {index: row for part in gather_object([rows]) for index, row in part.items()}
    order = sorted(rows)
    return (np.array([rows[i][0] for i in order], dtype=np.int64),
            np.array([rows[i][1] for i in order], dtype=np.int64))


def process_share(size: int, rank: int, world: int) -> list[int]:
    """Every world-th example from `rank`, padded by repeating its last one to ceil(size / world) examples."""
    if size == 0:
        return []
    share = list(range(rank, size, world)) or [size - 1]
    return share + share[-1:] * (-(-size // world) - len(share))
