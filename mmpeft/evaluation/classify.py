"""Label-text scoring of a whole split, with class text features computed once (they do not change in eval)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmpeft.data import ImageDataset, collate_images

if TYPE_CHECKING:
    from mmpeft.data import LabelSet


@torch.no_grad()
def predict(backbone, dataset: ImageDataset, labels: LabelSet, batch_size: int = 64,
            desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) for every example of `dataset`."""
    was_training = backbone.training
    backbone.eval()
    text_features = None if backbone.head is not None else backbone.class_text_features(labels)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_images(backbone.preprocess))
    truth, predicted = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        logits = backbone.classify(batch["pixel_values"], text_features)
        truth.append(batch["labels"].numpy())
        predicted.append(logits.argmax(-1).cpu().numpy())
    backbone.train(was_training)
    return np.concatenate(truth), np.concatenate(predicted)
