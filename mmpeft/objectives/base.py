"""What a training objective is: the loss of a batch (and its logits, for regularisers that need them)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmpeft.core.registry import Registry

OBJECTIVES: Registry[Callable] = Registry("objective")


class Objective:
    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError
