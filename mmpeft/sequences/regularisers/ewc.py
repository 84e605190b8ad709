"""EWC (Kirkpatrick et al. 2017): a quadratic pull towards each finished task's weights, weighted by the Fisher.

After task t the diagonal *empirical* Fisher is estimated on that task's training data at its final weights
theta*_t: F_k = mean over examples n of (d log p(y_n | x_n) / d theta_k)^2, with y_n the true label and
p the softmax over the classes trained at task t. `fisher: per_sample` takes the gradient of each example's
log-likelihood on its own (the definition above; one backward per example). `fisher: per_batch` squares the gradient
of each batch's mean log-likelihood instead (avalanche's estimate: one backward per batch, but it shrinks F by
about the batch size and mixes examples, so `strength` must be retuned).

Penalty while training later tasks: `strength * sum_t sum_k F_t,k (theta_k - theta*_t,k)^2`. The paper writes
lambda/2 in front; here `strength` is the whole factor (strength = lambda/2). Only trainable parameters are
estimated, stored and penalised. One (F, theta*) pair is kept per finished task; `online_ewc` keeps one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

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

FisherMode = Literal["per_sample", "per_batch"]


@dataclass(frozen=True)
class EWCConfig(RegulariserConfig):
    name: str = "ewc"
    # the whole factor in front of sum F (theta - theta*)^2 (lambda/2 in the paper)
    strength: Annotated[float, Range(ge=0)] = 1000.0
    fisher: FisherMode = "per_sample"
    # training examples of the task used for F (a seeded subset); null: all
    fisher_samples: Annotated[int, Range(ge=1)] | None = 256
    # per_batch: the batch whose mean gradient is squared (per_sample: always 1)
    fisher_batch_size: Annotated[int, Range(ge=1)] = 32


def empirical_fisher(params: dict[str, torch.Tensor], batches: Iterable, log_likelihood: Callable[..., torch.Tensor],
                     mode: FisherMode = "per_sample") -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of `params`: the mean squared gradient of the log-likelihood (see module doc).

    `log_likelihood(batch)` returns one log p(y_n | x_n) per example of the batch, differentiable in `params`.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    fisher = [torch.zeros_like(t) for t in tensors]
    count = 0
    for batch in batches:
        values = log_likelihood(batch)
        if mode == "per_sample":
            for n in range(len(values)):
                grads = torch.autograd.grad(values[n], tensors, retain_graph=n + 1 < len(values), allow_unused=True)
                _accumulate(fisher, grads)
            count += len(values)
        elif mode == "per_batch":
            _accumulate(fisher, torch.autograd.grad(values.mean(), tensors, allow_unused=True))
            count += 1
        else:
            raise ValueError(f"regulariser.fisher: {mode!r} is not one of 'per_sample', 'per_batch'")
    if count == 0:
        raise ValueError("the Fisher estimate got no examples")
    return {name: total / count for name, total in zip(names, fisher)}


def _accumulate(fisher: list[torch.Tensor], grads: tuple[torch.Tensor | None, ...]) -> None:
    for total, grad in zip(fisher, grads):
        if grad is not None:
            total += grad.detach().pow(2)


def task_fisher(task: TaskContext, params: dict[str, torch.Tensor], config: EWCConfig) -> dict[str, torch.Tensor]:
    """The empirical Fisher on the task's training data, model in eval mode (no dropout noise in the gradients)."""
    backbone = task.backbone
    was_training = backbone.training
    backbone.eval()

    def log_likelihood(batch: dict) -> torch.Tensor:
        log_probs = F.log_softmax(task.logits(batch).float(), dim=-1)
        labels = batch["labels"].to(log_probs.device)
        return log_probs.gather(1, labels[:, None]).squeeze(1)

    # per_sample: each example on its own (one forward and one backward each) is faster here than one batched
    # forward with a retained graph per example, and keeps memory flat for any model size
    batch_size = 1 if config.fisher == "per_sample" else config.fisher_batch_size
    try:
        with torch.enable_grad():
            return empirical_fisher(params, task.batches(batch_size, config.fisher_samples), log_likelihood,
                                    config.fisher)
    finally:
        backbone.train(was_training)


@register
class EWC(Regulariser):
    name = "ewc"
    Config = EWCConfig

    def __init__(self, config: EWCConfig, seed: int = 0):
        super().__init__(config, seed)
        self.terms: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (F_t, theta*_t)

    @classmethod
    def state_copies(cls, config: EWCConfig, tasks: int) -> tuple[int, str]:
        return 2 * (tasks - 1), f"a Fisher and an anchor per earlier task ({tasks - 1})"

    def begin_task(self, task: TaskContext) -> None:
        super().begin_task(task)
        self.terms = [(to_device(f, self.params), to_device(a, self.params)) for f, a in self.terms]

    def end_task(self, task: TaskContext) -> None:
        if task.is_last:
            return  # no task follows: a Fisher estimated now would never be used
        fisher = task_fisher(task, self.params, self.config)
        self.terms.append((fisher, snapshot(self.params)))

    def penalty(self, batch: dict | None = None) -> torch.Tensor | None:
        if not self.terms:
            return None
        total = sum(quadratic(self.params, anchor, fisher) for fisher, anchor in self.terms)
        return self.config.strength * total

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        for t, (fisher, anchor) in enumerate(self.terms):
            tensors.update(prefixed(f"task{t}/fisher", fisher))
            tensors.update(prefixed(f"task{t}/anchor", anchor))
        return tensors, {"terms": len(self.terms)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.terms = [(unprefixed(f"task{t}/fisher", tensors), unprefixed(f"task{t}/anchor", tensors))
                      for t in range(int(meta.get("terms", 0)))]
