"""Continual-learning regularisers: one module each, registered by name. `REGULARISER_MODULES` is the only list."""

from __future__ import annotations

import importlib

from mmpeft.sequences.regularisers.base import (
    REGULARISERS,
    Regulariser,
    RegulariserConfig,
    TaskContext,
    trainable_parameters,
)

REGULARISER_MODULES = ("naive", "ewc", "online_ewc", "l2sp", "lwf", "replay", "adapter_per_task")

for _module in REGULARISER_MODULES:
    importlib.import_module(f"mmpeft.sequences.regularisers.{_module}")


def make_regulariser(config: RegulariserConfig, seed: int = 0) -> Regulariser:
    """The regulariser named by `config.name`, built from its validated config."""
    return REGULARISERS.get(config.name)(config, seed)


__all__ = ["REGULARISERS", "Regulariser", "RegulariserConfig", "TaskContext", "make_regulariser",
           "trainable_parameters"]
