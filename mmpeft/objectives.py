"""Training objectives: what a batch's loss is. The loop in train.py knows nothing about models beyond this."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mmpeft.evaluation.classify import batch_logits
from mmpeft.registry import Registry

if TYPE_CHECKING:
    from mmpeft.data import ImageDataset, LabelSet

OBJECTIVES: Registry[Callable] = Registry("objective")


class Objective:
    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError


@OBJECTIVES.register("classification")
class Classification(Objective):
    """Cross-entropy over the scores of each image against every class's label text."""

    def __init__(self, backbone, labels: LabelSet, dataset: ImageDataset | None = None):
        self.backbone = backbone
        self.labels = labels

    def logits(self, batch: dict) -> torch.Tensor:
        text_features = None if self.backbone.head is not None else self.backbone.class_text_features(self.labels)
        return batch_logits(self.backbone, batch, text_features)

    def loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch), batch["labels"].to(self.backbone.device))


def make_objective(name: str, backbone, labels: LabelSet, dataset: ImageDataset | None = None) -> Objective:
    """`dataset` (the training set) lets an objective follow its seed and epoch (contrastive caption sampling)."""
    return OBJECTIVES.get(name)(backbone, labels, dataset)


import mmpeft.contrastive  # noqa: E402, F401  (registers "contrastive"; it imports OBJECTIVES from here)
import mmpeft.generative_objective  # noqa: E402, F401  (registers "generative")
