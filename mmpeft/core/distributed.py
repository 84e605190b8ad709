"""Which process am I: accelerate's PartialState, initialised the same way everywhere (CPU needs cpu=True)."""

from __future__ import annotations

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """Under torchrun / accelerate launch: rank and world size; in a plain process: one process, rank 0."""
    return PartialState(cpu=not torch.cuda.is_available())
