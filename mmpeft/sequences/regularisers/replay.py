"""Experience replay: a bounded memory of earlier tasks' training examples, mixed into every batch.

The memory holds references (task, example index, label), never images or tensors, so it checkpoints as a few
numbers and resolves against the task data on resume. After each task its training examples are streamed through
the memory in a seeded random order:
- `policy: reservoir` (Vitter's algorithm R): every example streamed so far is in memory with equal probability
  `memory_size / seen`.
- `policy: class_balanced`: `memory_size` is split evenly over the classes seen so far (the first
  `memory_size % classes` classes hold one more); each class keeps a reservoir sample of its own examples and is
  cut down at random when new classes shrink its share. A class with fewer examples than its share keeps them all.
While task i trains, each batch of B new examples gets `round(ratio * B)` examples drawn from the memory (without
replacement when it holds enough), seeded by (seed, task, epoch, batch), so a resumed run draws the same ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch

from mmpeft.core.schema import Range
from mmpeft.sequences.regularisers.base import Regulariser, RegulariserConfig, TaskContext, register

Policy = Literal["reservoir", "class_balanced"]


@dataclass(frozen=True)
class ReplayConfig(RegulariserConfig):
    name: str = "replay"
    memory_size: Annotated[int, Range(ge=1)] = 200  # examples kept over all earlier tasks
    policy: Policy = "class_balanced"
    ratio: Annotated[float, Range(gt=0)] = 0.5  # replayed examples per new example in a batch


@dataclass(frozen=True)
class Entry:
    task: int
    index: int  # position in that task's training split
    label: int


class ReplayMemory:
    """The bounded memory alone (no model, no data): testable by itself."""

    def __init__(self, capacity: int, policy: Policy = "class_balanced", seed: int = 0):
        if policy not in ("reservoir", "class_balanced"):
            raise ValueError(f"regulariser.policy: {policy!r} is not one of 'reservoir', 'class_balanced'")
        self.capacity, self.policy, self.seed = capacity, policy, seed
        self.slots: list[Entry] = []  # reservoir
        self.buckets: dict[int, list[Entry]] = {}  # class_balanced: label -> entries
        self.seen: dict[int, int] = {}  # examples streamed so far, per label (reservoir uses the total)

    @property
    def entries(self) -> list[Entry]:
        if self.policy == "reservoir":
            return list(self.slots)
        return [entry for label in sorted(self.buckets) for entry in self.buckets[label]]

    def __len__(self) -> int:
        return len(self.slots) if self.policy == "reservoir" else sum(len(b) for b in self.buckets.values())

    def add_task(self, task: int, labels: list[int]) -> None:
        """Stream task `task`'s examples (labels[i] is example i's label) through the memory."""
        rng = random.Random(f"mmpeft-replay:{self.seed}:{task}")
        order = list(range(len(labels)))
        rng.shuffle(order)
        if self.policy == "reservoir":
            total = sum(self.seen.values())
            for i in order:
                total += 1
                self.seen[labels[i]] = self.seen.get(labels[i], 0) + 1
                entry = Entry(task, i, labels[i])
                if len(self.slots) < self.capacity:
                    self.slots.append(entry)
                else:
                    j = rng.randrange(total)
                    if j < self.capacity:
                        self.slots[j] = entry
            return
        for label in sorted(set(labels)):
            self.buckets.setdefault(label, [])
        quota = self.quotas()
        for label, bucket in self.buckets.items():  # shrink old classes' shares, keeping a random subset
            if len(bucket) > quota[label]:
                keep = sorted(rng.sample(range(len(bucket)), quota[label]))
                self.buckets[label] = [bucket[k] for k in keep]
        for i in order:
            label = labels[i]
            self.seen[label] = self.seen.get(label, 0) + 1
            bucket, entry = self.buckets[label], Entry(task, i, label)
            if len(bucket) < quota[label]:
                bucket.append(entry)
            else:
                j = rng.randrange(self.seen[label])
                if j < quota[label]:
                    bucket[j] = entry

    def quotas(self) -> dict[int, int]:
        """Each known class's share of the memory: equal, the remainder to the first classes."""
        labels = sorted(self.buckets)
        base, extra = divmod(self.capacity, max(len(labels), 1))
        return {label: base + (1 if k < extra else 0) for k, label in enumerate(labels)}

    def sample(self, count: int, rng: np.random.Generator) -> list[Entry]:
        entries = self.entries
        if not entries or count <= 0:
            return []
        picks = rng.choice(len(entries), size=count, replace=count > len(entries))
        return [entries[int(k)] for k in picks]

    def to_meta(self) -> dict:
        return {"entries": [[e.task, e.index, e.label] for e in self.entries],
                "seen": {str(label): n for label, n in self.seen.items()}}

    def load_meta(self, meta: dict) -> None:
        entries = [Entry(int(t), int(i), int(y)) for t, i, y in meta.get("entries", [])]
        self.seen = {int(label): int(n) for label, n in meta.get("seen", {}).items()}
        self.slots, self.buckets = [], {}
        if self.policy == "reservoir":
            self.slots = entries
        else:
            for label in self.seen:
                self.buckets.setdefault(label, [])
            for entry in entries:
                self.buckets.setdefault(entry.label, []).append(entry)


@register
class Replay(Regulariser):
    name = "replay"
    Config = ReplayConfig

    def __init__(self, config: ReplayConfig, seed: int = 0):
        super().__init__(config, seed)
        self.memory = ReplayMemory(config.memory_size, config.policy, seed)

    def end_task(self, task: TaskContext) -> None:
        self.memory.add_task(task.index, task.train_set.labels)

    def transform_batch(self, batch: dict) -> dict:
        task = self.context
        if task is None or len(self.memory) == 0:
            return batch
        indices = batch["index"].tolist()
        epoch = self.trainer.progress.epoch if self.trainer is not None else 0
        rng = np.random.default_rng([self.seed, task.index, epoch, *(i + 1 for i in indices)])
        picked = self.memory.sample(round(self.config.ratio * len(indices)), rng)
        if not picked:
            return batch
        old = task.collate([task.train_sets[e.task][e.index] for e in picked])
        mixed = dict(batch)
        mixed["pixel_values"] = torch.cat([batch["pixel_values"], old["pixel_values"].to(batch["pixel_values"])])
        mixed["labels"] = torch.cat([batch["labels"], old["labels"]])
        mixed["index"] = torch.cat([batch["index"], torch.full((len(picked),), -1, dtype=batch["index"].dtype)])
        return mixed

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, self.memory.to_meta()

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.memory.load_meta(meta)
