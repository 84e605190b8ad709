"""Which process am I: accelerate's PartialState, initialised the same way everywhere (CPU needs cpu=True)."""

from __future__ import annotations

import torch
from accelerate import PartialState


def sum_over_processes(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over every process of the run (itself in a plain process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def process_state() -> PartialState:
    """Under torchrun / accelerate launch: rank and world size; in a plain process: one process, rank 0."""
    return PartialState(cpu=not torch.cuda.is_available())
