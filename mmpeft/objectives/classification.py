"""`train.objective: classification`: cross-entropy over each image's scores against every class's label text."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mmpeft.objectives.base import OBJECTIVES, Objective

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import ImageDataset, LabelSet


@OBJECTIVES.register("classification")
class Classification(Objective):
    """Cross-entropy over the scores of each image against every class's label text."""

    def __init__(self, backbone: Backbone, labels: LabelSet, dataset: ImageDataset | None = None):
        self.backbone = backbone
        self.labels = labels

    def logits(self, batch: dict) -> torch.Tensor:
        text_features = None if self.backbone.head is not None else self.backbone.class_text_features(self.labels)
        return self.backbone.logits(batch, text_features)

    def loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch), batch["labels"].to(self.backbone.device))
