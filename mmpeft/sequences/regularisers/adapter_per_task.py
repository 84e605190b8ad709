"""One adapter per task: the dynamic-architecture reference, with the task id given at evaluation.

Every task trains a fresh copy of the method's trainable state (with LoRA: a fresh adapter, starting from the same
initialisation as the first) and keeps it; evaluating task j loads task j's state, so nothing a later task learns can
overwrite it. A task not yet trained is evaluated with the initial state (for LoRA: the pre-trained model, i.e.
zero-shot); the control set, which has no task id, uses the state of the last task trained. Only trainable state is
stored (one copy per task): for LoRA a few kilobytes each, for `method: full` a whole model each.

It is the upper reference for forgetting (none, by construction, up to the label set growing in class-incremental
sequences), not a regulariser one would deploy without task ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mmpeft.sequences.regularisers.base import (
    Regulariser,
    RegulariserConfig,
    TaskContext,
    copy_into,
    prefixed,
    register,
    snapshot,
    unprefixed,
)


@register
class AdapterPerTask(Regulariser):
    name = "adapter_per_task"

    def __init__(self, config, seed: int = 0):
        super().__init__(config, seed)
        self.initial: dict[str, torch.Tensor] | None = None
        self.per_task: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def state_copies(cls, config: RegulariserConfig, tasks: int) -> tuple[int, str]:
        return tasks, f"the initial adapter and one per earlier task ({tasks - 1})"

    def begin_task(self, task: TaskContext) -> None:
        super().begin_task(task)
        if self.initial is None:
            self.initial = snapshot(self.params)
        copy_into(self.params, self.initial)  # a fresh adapter for this task

    def end_task(self, task: TaskContext) -> None:
        self.per_task[task.index] = snapshot(self.params)

    @contextlib.contextmanager
    def evaluating(self, task: int | None) -> Iterator[None]:
        if task is None or not self.params:
            yield
            return
        current = snapshot(self.params)
        copy_into(self.params, self.per_task.get(task, self.initial or current))
        try:
            yield
        finally:
            copy_into(self.params, current)

    def task_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """Each trained task's own state, for exporting one adapter per task."""
        return dict(self.per_task)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = prefixed("initial", self.initial) if self.initial is not None else {}
        for index, state in self.per_task.items():
            tensors.update(prefixed(f"task{index}", state))
        return tensors, {"tasks": sorted(self.per_task)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.initial = unprefixed("initial", tensors) or None
        self.per_task = {int(i): unprefixed(f"task{i}", tensors) for i in meta.get("tasks", [])}
