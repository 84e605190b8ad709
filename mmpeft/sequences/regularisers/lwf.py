"""LwF (Li & Hoiem 2016): keep the previous model's outputs on the new task's images, by distillation.

From the second task on, each batch adds `alpha * T^2 * KL(softmax(z_old / T) || softmax(z / T))`, averaged over
the batch, where z_old are the logits of the model as it was when the task began and z the current ones, both over
the classes known before the task (a prefix of the current label set; all of them in a domain-incremental
sequence). T^2 keeps the gradient scale independent of T (Hinton et al.); KL rather than cross-entropy makes the
term exactly zero at the previous weights.

The previous model is never deep-copied. `targets: precompute` (default) runs the model once over the task's
training images before the task trains and keeps z_old per example (a [examples, old classes] table; it assumes
the images a batch sees are the un-augmented ones, so it refuses `data.augment`). `targets: swap` keeps a copy of
the trainable state only and, for each batch, swaps it in to compute z_old (exact under augmentation, one extra
forward per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import torch
import torch.nn.functional as F

from mmpeft.core.schema import Range
from mmpeft.data.augment import augment_enabled
from mmpeft.sequences.regularisers.base import (
    Regulariser,
    RegulariserConfig,
    TaskContext,
    copy_into,
    register,
    snapshot,
)

if TYPE_CHECKING:
    from mmpeft.sequences.spec import ContinualRecipe

TARGETS_KEY = "lwf_targets"


@dataclass(frozen=True)
class LwFConfig(RegulariserConfig):
    name: str = "lwf"
    alpha: Annotated[float, Range(ge=0)] = 1.0  # weight of the distillation term
    temperature: Annotated[float, Range(gt=0)] = 2.0  # T: softens both distributions
    targets: Literal["precompute", "swap"] = "precompute"


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch."""
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return temperature ** 2 * kl.mean()


@register
class LwF(Regulariser):
    name = "lwf"
    Config = LwFConfig

    def __init__(self, config: LwFConfig, seed: int = 0):
        super().__init__(config, seed)
        self.old_classes = 0
        self.table: torch.Tensor | None = None  # precompute: z_old per training example
        self.old_state: dict[str, torch.Tensor] | None = None  # swap: the trainable state the task began with

    @classmethod
    def check(cls, recipe: ContinualRecipe) -> list[str]:
        if recipe.regulariser.targets != "precompute":
            return []
        augmented = [t.name for t in recipe.tasks if augment_enabled(t.data.augment)]
        if augmented:
            return [f"regulariser.targets: 'precompute' computes the previous model's outputs once on un-augmented "
                    f"images, but data.augment is on for task(s) {', '.join(augmented)}; use targets: swap"]
        return []

    @classmethod
    def state_copies(cls, config: LwFConfig, tasks: int) -> tuple[int, str]:
        return (1, "the previous task's parameters (targets: swap)") if config.targets == "swap" else (0, "")

    def begin_task(self, task: TaskContext) -> None:
        super().begin_task(task)
        self.old_classes = task.previous_classes
        self.table, self.old_state = None, None
        if self.old_classes == 0:
            return  # the first task: there is no previous model
        if self.config.targets == "swap":
            self.old_state = snapshot(self.params)
            return
        rows = []
        with torch.no_grad(), _eval_mode(task.backbone):
            for batch in task.batches():
                rows.append(task.logits(batch)[:, :self.old_classes].float())
        self.table = torch.cat(rows)

    def transform_batch(self, batch: dict) -> dict:
        if self.old_classes == 0:
            return batch
        if self.table is not None:
            batch[TARGETS_KEY] = self.table[batch["index"].to(self.table.device)]
        elif self.old_state is not None and self.context is not None:
            current = snapshot(self.params)
            copy_into(self.params, self.old_state)
            try:
                with torch.no_grad(), _eval_mode(self.context.backbone):
                    batch[TARGETS_KEY] = self.context.logits(batch)[:, :self.old_classes].float()
            finally:
                copy_into(self.params, current)
        return batch

    def penalty(self, batch: dict | None = None) -> torch.Tensor | None:
        if self.old_classes == 0 or batch is None or TARGETS_KEY not in batch or self.context is None:
            return None
        logits = batch.get("logits")  # the objective's logits of this batch, when it kept them
        if logits is None:
            logits = self.context.logits(batch)
        teacher = batch[TARGETS_KEY].to(logits.device)
        return self.config.alpha * distillation(logits[:, :self.old_classes], teacher, self.config.temperature)


class _eval_mode:
    """Dropout off for the teacher's outputs; the previous train/eval mode comes back afterwards."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)
