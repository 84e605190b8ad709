"""The shape of a regulariser: a Trainer callback plus task-boundary steps, acting only on trainable parameters.

Why this shape: a regulariser must be testable without a training loop and must never hold a copy of a frozen
backbone. So it sees the model only through `trainable_parameters` (requires_grad), keeps its own state as a flat
dict of tensors plus JSON-able facts (checkpointed after every task), and plugs into `mmpeft.train.Trainer` through
the ordinary hooks: `extra_loss` for penalties, `transform_batch` for replay. Task boundaries are not Trainer hooks:
the continual runner calls `begin_task` (with the weights as they were when the task began, also on resume) and
`end_task` (with the weights the task ended with) around each task's Trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.utils.data import Subset

from mmpeft.core.registry import Registry
from mmpeft.data.loader import make_loader
from mmpeft.train import Callback

if TYPE_CHECKING:
    from mmpeft.data import ImageDataset, LabelSet
    from mmpeft.sequences.spec import ContinualRecipe
    from mmpeft.train import Trainer


@dataclass(frozen=True)
class RegulariserConfig:
    name: str


@dataclass
class TaskContext:
    """What a regulariser may use at a task boundary; labels are numbered in the sequence's class order."""

    index: int  # the task's position in the sequence
    backbone: nn.Module
    train_set: ImageDataset  # this task's training split, without augmentation
    train_sets: list[ImageDataset]  # every task's training split (replay reads old tasks' examples from these)
    labels: LabelSet  # the classes this task trains against: every class seen so far
    previous_classes: int  # classes known before this task (a prefix of `labels`); 0 for the first task
    logits: Callable[[dict], torch.Tensor]  # batch -> logits over `labels` (the training objective's)
    collate: Callable[[list[dict]], dict]
    batch_size: int
    seed: int
    is_last: bool = False  # no task follows (state kept only for later tasks need not be computed)

    def batches(self, batch_size: int | None = None, limit: int | None = None) -> Iterator[dict]:
        """The task's training examples in a fixed order (the first `limit` of a seeded permutation)."""
        dataset: torch.utils.data.Dataset = self.train_set
        if limit is not None and limit < len(self.train_set):
            order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.seed))
            dataset = Subset(self.train_set, sorted(order[:limit].tolist()))
        yield from make_loader(dataset, self.backbone, batch_size=batch_size or self.batch_size, collate=self.collate)


class Regulariser(Callback):
    """No-op defaults; a subclass overrides what it needs. `extra_loss` returns `penalty(batch)`."""

    name: ClassVar[str]
    Config: ClassVar[type] = RegulariserConfig

    def __init__(self, config: RegulariserConfig, seed: int = 0):
        self.config = config
        self.seed = seed
        self.params: dict[str, nn.Parameter] = {}
        self.context: TaskContext | None = None
        self.trainer: Trainer | None = None

    @classmethod
    def check(cls, recipe: ContinualRecipe) -> list[str]:
        """Problems with this regulariser in this recipe, found before any model loads."""
        return []

    @classmethod
    def state_copies(cls, config: RegulariserConfig, tasks: int) -> tuple[int, str]:
        """Copies of the trainable parameters it holds while the last of `tasks` trains, and what they are (for
        `mmpeft plan`)."""
        return 0, ""

    # --- task boundaries (called by the continual runner) -------------------------------------------------------
    def begin_task(self, task: TaskContext) -> None:
        self.context = task
        self.params = trainable_parameters(task.backbone)
        if not self.params:
            raise ValueError("the method left no trainable parameters: nothing for a regulariser to act on")

    def end_task(self, task: TaskContext) -> None: ...

    # --- Trainer hooks ------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def extra_loss(self, batch: dict) -> torch.Tensor | None:
        return self.penalty(batch)

    def penalty(self, batch: dict | None = None) -> torch.Tensor | None:
        """The regularisation term at the current parameters (None: this regulariser adds no loss)."""
        return None

    # --- evaluation ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluating(self, task: int | None) -> Iterator[None]:
        """Set the model up to evaluate task `task` (None: no task id, e.g. the control set). Default: as is."""
        yield

    # --- state (checkpointed after every task) ------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able facts) that, with the trainable weights, let a run continue at the next task."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...


REGULARISERS: Registry[type[Regulariser]] = Registry("regulariser")


def register(cls: type[Regulariser]) -> type[Regulariser]:
    return REGULARISERS.register(cls.name)(cls)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Only what trains: a frozen backbone's weights are never copied, penalised or stored."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def copy_into(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    """Overwrite parameter values in place (the optimizer keeps pointing at the same tensors)."""
    missing = [name for name in params if name not in state]
    if missing:
        raise ValueError(f"saved regulariser state lacks trainable parameters {missing[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))


def quadratic(params: dict[str, nn.Parameter], anchor: dict[str, torch.Tensor],
              weight: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """sum_k w_k (theta_k - anchor_k)^2 over trainable parameters (w = 1 when `weight` is None)."""
    total = None
    for name, param in params.items():
        diff = param - anchor[name].to(param.device)
        term = (diff.pow(2) if weight is None else weight[name].to(param.device) * diff.pow(2)).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def to_device(state: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: tensor.to(params[name].device) if name in params else tensor for name, tensor in state.items()}


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{name}": tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    head = prefix + "/"
    return {name[len(head):]: tensor for name, tensor in tensors.items() if name.startswith(head)}
