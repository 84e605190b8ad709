"""Layer 4: the accelerate training loop, its checkpoints and the callbacks sequences plug into."""

from __future__ import annotations

from mmpeft.train.loop import (
    CHECKPOINT_DIR,
    Callback,
    Trainer,
    TrainingDiverged,
    enable_gradient_checkpointing,
    make_optimizer,
    shard,
)

__all__ = ["CHECKPOINT_DIR", "Callback", "Trainer", "TrainingDiverged", "enable_gradient_checkpointing",
           "make_optimizer", "shard"]
