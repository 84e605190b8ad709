"""The planner's arithmetic: one step's memory from measured figures, the largest batch that fits, what to change.

    peak  = weights + optimizer state + max(activations + workspace, gradients + optimizer-step buffers)
    total = peak + runtime reserve (CUDA context and allocator slack)

Gradients fill up during backward while the activations that produced them are freed, and the optimizer step
runs after the last activation is gone, so activations and gradients are not added: the peak is the larger phase.
Figures are gathered once per recipe; every what-if (batch, checkpointing, 4-bit, 8-bit AdamW) is arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from mmpeft.planner.trace import ActivationTrace

Device = Literal["cuda", "cpu"]

# Not measurable without a GPU here, so a stated rule of thumb: what a CUDA process holds beyond its tensors.
CUDA_CONTEXT = 512 * 2**20
ALLOCATOR_SLACK = 0.05
# Backward holds the gradient flowing into and out of the op it differentiates: about two of the largest kept tensors.
BACKWARD_BUFFERS = 2
MIN_8BIT_STATE = 4096  # bitsandbytes keeps 32-bit optimizer states for smaller tensors
STATE_BLOCK = 256  # 8-bit optimizer states: one fp32 absmax per 256 values, per state


@dataclass
class Activations:
    """Kept activations traced at batch sizes `batch` and `batch + 1`: exact there, linear in the batch beyond."""

    batch: int
    at: ActivationTrace
    next: ActivationTrace

    def _linear(self, a: float, b: float, batch: int) -> int:
        return max(0, round(a + (b - a) * (batch - self.batch)))

    def kept(self, batch: int, checkpointing: bool) -> int:
        if checkpointing:
            return self._linear(self.at.checkpointed(), self.next.checkpointed(), batch)
        return self._linear(self.at.total, self.next.total, batch)

    def largest(self, batch: int) -> int:
        return self._linear(self.at.largest, self.next.largest, batch)


@dataclass
class Figures:
    """What a plan needs that does not change with batch size, checkpointing, quantization or optimizer."""

    weights: dict[int | None, int]  # quantization bits (None: none) -> bytes of parameters and buffers
    trainable: list[tuple[int, int]]  # (numel, element size) per trainable parameter; empty when nothing trains
    activations: Activations
    input_per_sample: int  # bytes of one example's pixels
    device: Device = "cuda"
    state_copies: int = 0  # copies of the trainable parameters held beside the model (a regulariser's anchors)

    def gradients(self) -> int:
        return sum(n * size for n, size in self.trainable)

    def optimizer(self, kind: str) -> int:
        """torch AdamW keeps exp_avg and exp_avg_sq at the parameter's dtype; bitsandbytes' 8-bit AdamW a byte each."""
        if kind == "adamw_8bit":
            return sum(2 * n + 8 * math.ceil(n / STATE_BLOCK) if n >= MIN_8BIT_STATE else 8 * n
                       for n, _ in self.trainable)
        return sum(2 * n * size for n, size in self.trainable)

    def step_buffers(self, kind: str) -> int:
        """Temporaries of `optimizer.step()`: CUDA's foreach AdamW makes one per parameter at once, CPU's loop two of
        the largest; bitsandbytes updates in place."""
        sizes = [n * size for n, size in self.trainable]
        if not sizes or kind == "adamw_8bit":
            return 0
        return sum(sizes) if self.device == "cuda" else 2 * max(sizes)


@dataclass(frozen=True)
class Settings:
    """The knobs a plan varies; `overrides` spells a change as recipe overrides."""

    batch: int
    checkpointing: bool
    bits: int | None
    optimizer: str

    def changed(self, base: Settings) -> set[str]:
        """Which knobs other than the batch differ from `base`."""
        return {knob for knob in ("checkpointing", "bits", "optimizer") if getattr(self, knob) != getattr(base, knob)}

    def overrides(self, base: Settings, accumulate: int) -> str:
        changes = []
        if self.batch != base.batch:
            changes.append(f"train.batch_size={self.batch}")
            if accumulate > 1:
                changes.append(f"train.grad_accum_steps={accumulate}")
        if self.checkpointing != base.checkpointing:
            changes.append(f"train.gradient_checkpointing={str(self.checkpointing).lower()}")
        if self.bits != base.bits:
            changes.append(f"backbone.quantization.bits={self.bits}")
        if self.optimizer != base.optimizer:
            changes.append(f"train.optimizer={self.optimizer}")
        return " ".join(changes)


@dataclass(frozen=True)
class Estimate:
    """Bytes of one training step, by kind; `peak` is what tensors need, `total` adds the runtime reserve."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    workspace: int
    step_buffers: int
    regulariser: int
    peak: int
    reserve: int
    total: int


def estimate(figures: Figures, settings: Settings) -> Estimate:
    """The memory of one training step under `settings`."""
    trains = bool(figures.trainable)
    activations = figures.activations.kept(settings.batch, settings.checkpointing)
    largest = figures.activations.largest(settings.batch)
    workspace = figures.input_per_sample * settings.batch + BACKWARD_BUFFERS * largest if trains else 0
    gradients, buffers = figures.gradients(), figures.step_buffers(settings.optimizer)
    optimizer = figures.optimizer(settings.optimizer)
    weights = figures.weights[settings.bits]
    regulariser = figures.state_copies * gradients
    peak = weights + optimizer + regulariser + max(activations + workspace, gradients + buffers)
    reserve = CUDA_CONTEXT + round(ALLOCATOR_SLACK * peak) if figures.device == "cuda" else 0
    return Estimate(weights, gradients, optimizer, activations, workspace, buffers, regulariser, peak, reserve,
                    peak + reserve)


def largest_batch(figures: Figures, settings: Settings, budget: int, limit: int = 1 << 20) -> int:
    """The largest batch size that fits `budget` with `settings` otherwise unchanged (0: not even one example)."""
    def fits(batch: int) -> bool:
        return estimate(figures, dataclasses.replace(settings, batch=batch)).total <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while high < limit and fits(high):
        low, high = high, high * 2
    if high >= limit and fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def suggestions(figures: Figures, base: Settings, budget: int, quantizable: tuple[int, ...]) -> list[dict]:
    """Overrides that fit, cheapest change first: a smaller batch (with accumulation keeping the effective batch),
    checkpointing, 4-bit weights where the method trains on them, else 8-bit AdamW states, and their combinations.
    A combination is left out when fewer changes already reach its batch. Each says its total and why."""
    options = [base, dataclasses.replace(base, checkpointing=True)]
    if 4 in quantizable and base.bits != 4:
        options += [dataclasses.replace(option, bits=4) for option in options]
    elif base.optimizer != "adamw_8bit":
        options += [dataclasses.replace(option, optimizer="adamw_8bit") for option in options]
    found: list[dict] = []
    done: list[tuple[set[str], int]] = []  # (knobs changed, per-step batch) of each suggestion so far
    for option in options:
        knobs = option.changed(base)
        batch = largest_batch(figures, option, budget)
        if batch == 0:
            continue
        micro, accumulate = micro_batch(base.batch, batch)
        chosen = dataclasses.replace(option, batch=micro)
        change = chosen.overrides(base, accumulate)
        if not change or any(fewer <= knobs and size >= micro for fewer, size in done):
            continue  # a suggestion with fewer changes already runs this batch
        done.append((knobs, micro))
        found.append({"change": change, "total": estimate(figures, chosen).total, "max_batch": batch,
                      "why": _why(base, chosen, accumulate)})
    if not found:
        found.append({"change": None, "total": None, "max_batch": 0,
                      "why": "nothing planned here fits one example: a larger GPU, several GPUs with "
                             "train.strategy=fsdp, or a smaller backbone"})
    return found


def micro_batch(batch: int, fits: int) -> tuple[int, int]:
    """(per-step batch, accumulation steps) for a recipe batch when at most `fits` examples fit: the largest divisor
    of `batch` that fits keeps the effective batch exact, unless it wastes more than half of what fits."""
    if fits >= batch:
        return batch, 1
    divisor = max(d for d in range(1, fits + 1) if batch % d == 0)
    if 2 * divisor >= fits:
        return divisor, batch // divisor
    accumulate = math.ceil(batch / fits)
    return math.ceil(batch / accumulate), accumulate


def _why(base: Settings, chosen: Settings, accumulate: int) -> str:
    parts = []
    if chosen.batch != base.batch:
        effective = chosen.batch * accumulate
        kept = "keeps the effective batch" if effective == base.batch else "makes the effective batch"
        parts.append(f"batch {chosen.batch} x {accumulate} accumulation steps {kept} {effective}")
    if chosen.checkpointing != base.checkpointing:
        parts.append("activations recomputed in backward (slower steps)")
    if chosen.bits != base.bits:
        parts.append(f"{chosen.bits}-bit base weights (bitsandbytes, CUDA)")
    if chosen.optimizer != base.optimizer:
        parts.append("8-bit AdamW states (bitsandbytes, CUDA)")
    return "; ".join(parts)
