"""Label-text scoring of a whole split, with class text features computed once (they do not change in eval)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmpeft.data import collate_images

if TYPE_CHECKING:
    from mmpeft.data import LabelSet


def batch_logits(backbone, batch: dict, text_features: torch.Tensor | None) -> torch.Tensor:
    """Logits of a batch of images, or of cached image features (the batches of a FeatureDataset)."""
    if "image_features" in batch:
        return backbone.score(batch["image_features"], text_features)
    if hasattr(backbone, "classify_batch"):  # generative: each example's own prompt matters, not only its image
        return backbone.classify_batch(batch, text_features)
    return backbone.classify(batch["pixel_values"], text_features)


@torch.no_grad()
def predict(backbone, dataset: Dataset, labels: LabelSet, batch_size: int = 64,
            desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) for every example of `dataset`."""
    was_training = backbone.training
    backbone.eval()
    text_features = None if backbone.head is not None else backbone.class_text_features(labels)
    collate = getattr(dataset, "collate", None) or collate_images(backbone.preprocess)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    truth, predicted = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        logits = batch_logits(backbone, batch, text_features)
        truth.append(batch["labels"].numpy())
        predicted.append(logits.argmax(-1).cpu().numpy())
    backbone.train(was_training)
    return np.concatenate(truth), np.concatenate(predicted)
