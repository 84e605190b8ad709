"""Continual-learning regularisers: one module each, registered by name (one import line below each)."""

from __future__ import annotations

import mmpeft.sequences.regularisers.adapter_per_task  # noqa: F401
import mmpeft.sequences.regularisers.ewc  # noqa: F401
import mmpeft.sequences.regularisers.l2sp  # noqa: F401
import mmpeft.sequences.regularisers.lwf  # noqa: F401
import mmpeft.sequences.regularisers.naive  # noqa: F401
import mmpeft.sequences.regularisers.online_ewc  # noqa: F401
import mmpeft.sequences.regularisers.replay  # noqa: F401
from mmpeft.sequences.regularisers.base import (
    REGULARISERS,
    Regulariser,
    RegulariserConfig,
    TaskContext,
    trainable_parameters,
)


def make_regulariser(config: RegulariserConfig, seed: int = 0) -> Regulariser:
    """The regulariser named by `config.name`, built from its validated config."""
    return REGULARISERS.get(config.name)(config, seed)


__all__ = ["REGULARISERS", "Regulariser", "RegulariserConfig", "TaskContext", "make_regulariser",
           "trainable_parameters"]
