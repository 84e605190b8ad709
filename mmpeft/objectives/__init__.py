"""Training objectives: what a batch's loss is. The loop in mmpeft.train knows nothing about models beyond this.

Adding an objective is one module that registers itself in OBJECTIVES plus one import line below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mmpeft.objectives.classification  # noqa: F401  (registers "classification")
import mmpeft.objectives.contrastive  # noqa: F401  (registers "contrastive")
import mmpeft.objectives.generative  # noqa: F401  (registers "generative")
from mmpeft.objectives.base import OBJECTIVES, Objective
from mmpeft.objectives.classification import Classification

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import ImageDataset, LabelSet

__all__ = ["OBJECTIVES", "Classification", "Objective", "make_objective"]


def make_objective(name: str, backbone: Backbone, labels: LabelSet, dataset: ImageDataset | None = None) -> Objective:
    """`dataset` (the training set) lets an objective follow its seed and epoch (contrastive caption sampling)."""
    return OBJECTIVES.get(name)(backbone, labels, dataset)
