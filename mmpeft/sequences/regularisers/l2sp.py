"""L2-SP (Li et al. 2018): pull the trainable parameters back to where the sequence started.

Penalty: `strength * sum_k (theta_k - theta0_k)^2` over trainable parameters, with theta0 the trainable state
before the first task (for LoRA: the untouched adapter, i.e. the pre-trained model). The paper writes alpha/2 in
front; here `strength` is the whole factor (strength = alpha/2). The anchor is checkpointed, so a resumed run
keeps the true starting point rather than the weights it resumed from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from mmpeft.core.schema import Range
from mmpeft.sequences.regularisers.base import (
    Regulariser,
    RegulariserConfig,
    TaskContext,
    prefixed,
    quadratic,
    register,
    snapshot,
    to_device,
    unprefixed,
)


@dataclass(frozen=True)
class L2SPConfig(RegulariserConfig):
    name: str = "l2sp"
    strength: Annotated[float, Range(ge=0)] = 0.1  # the whole factor in front of sum (theta - theta0)^2


@register
class L2SP(Regulariser):
    name = "l2sp"
    Config = L2SPConfig

    def __init__(self, config: L2SPConfig, seed: int = 0):
        super().__init__(config, seed)
        self.anchor: dict[str, torch.Tensor] | None = None

    @classmethod
    def state_copies(cls, config: L2SPConfig, tasks: int) -> tuple[int, str]:
        return 1, "the starting point (anchor)"

    def begin_task(self, task: TaskContext) -> None:
        super().begin_task(task)
        if self.anchor is None:  # the first task: the starting point is the model as it is now
            self.anchor = snapshot(self.params)
        self.anchor = to_device(self.anchor, self.params)

    def penalty(self, batch: dict | None = None) -> torch.Tensor | None:
        if self.anchor is None:
            return None
        return self.config.strength * quadratic(self.params, self.anchor)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return (prefixed("anchor", self.anchor) if self.anchor is not None else {}), {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.anchor = unprefixed("anchor", tensors) or None
