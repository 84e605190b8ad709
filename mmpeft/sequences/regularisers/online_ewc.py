"""Online EWC (Schwarz et al. 2018): one running Fisher with decay gamma and one anchor, whatever the task count.

After task t: F <- gamma * F + F_t and theta* <- theta*_t, so memory stays at two copies of the trainable state
(EWC keeps two per finished task). Penalty: `strength * sum_k F_k (theta_k - theta*_k)^2` (strength = lambda/2
in the paper's notation); F_t is estimated exactly as in `ewc` (see its `fisher` setting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from mmpeft.core.schema import Range
from mmpeft.sequences.regularisers.base import (
    Regulariser,
    TaskContext,
    prefixed,
    quadratic,
    register,
    snapshot,
    to_device,
    unprefixed,
)
from mmpeft.sequences.regularisers.ewc import EWCConfig, task_fisher


@dataclass(frozen=True)
class OnlineEWCConfig(EWCConfig):
    name: str = "online_ewc"
    # decay of the running Fisher per task: 1 weighs every task alike, 0 keeps only the last
    gamma: Annotated[float, Range(ge=0, le=1)] = 0.9


@register
class OnlineEWC(Regulariser):
    name = "online_ewc"
    Config = OnlineEWCConfig

    def __init__(self, config: OnlineEWCConfig, seed: int = 0):
        super().__init__(config, seed)
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None

    @classmethod
    def state_copies(cls, config: OnlineEWCConfig, tasks: int) -> tuple[int, str]:
        return (2, "the running Fisher and the last anchor") if tasks > 1 else (0, "")

    def begin_task(self, task: TaskContext) -> None:
        super().begin_task(task)
        if self.fisher is not None and self.anchor is not None:
            self.fisher, self.anchor = to_device(self.fisher, self.params), to_device(self.anchor, self.params)

    def end_task(self, task: TaskContext) -> None:
        if task.is_last:
            return  # no task follows: a Fisher estimated now would never be used
        new = task_fisher(task, self.params, self.config)
        if self.fisher is None:
            self.fisher = new
        else:
            self.fisher = {name: self.config.gamma * self.fisher[name] + new[name] for name in new}
        self.anchor = snapshot(self.params)

    def penalty(self, batch: dict | None = None) -> torch.Tensor | None:
        if self.fisher is None or self.anchor is None:
            return None
        return self.config.strength * quadratic(self.params, self.anchor, self.fisher)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self.fisher is None or self.anchor is None:
            return {}, {}
        return {**prefixed("fisher", self.fisher), **prefixed("anchor", self.anchor)}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.fisher = unprefixed("fisher", tensors) or None
        self.anchor = unprefixed("anchor", tensors) or None
