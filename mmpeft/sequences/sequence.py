"""The data of a task sequence, and the label protocol every regulariser is measured under.

Protocol (class-incremental, single head, no task id at test time; van de Ven & Tolias' "class-IL"): classes are
numbered in the order tasks first bring them, so the classes seen up to task i are a prefix of that order. While
training task i, and when evaluating after it, an image is scored against the label texts of every class seen so
far (tasks 0..i), not just its own task's. A task not yet trained (j > i, needed for forward transfer) is scored
against the classes of tasks 0..j, the set it will meet when its turn comes; the zero-shot baseline of task j uses
the same set. Domain-incremental sequences (every task the same classes, e.g. different shifts) are the special
case where that set never grows. The one-adapter-per-task reference is also scored this way; only its choice of
adapter uses the task id.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mmpeft.core.schema import did_you_mean, to_plain
from mmpeft.data import DataError, DataSplits, Example, ImageDataset, LabelSet, load_data
from mmpeft.data.shifts import parse_shift
from mmpeft.sequences.tasks import ContinualRecipe, Task


@dataclass
class TaskData:
    """One task's splits, with labels already numbered in the sequence's class order."""

    task: Task
    classes: list[str]  # this task's class keys
    train: list[Example]
    val: list[Example]
    test: list[Example]
    shifts: tuple[str, ...]

    def dataset(self, split: str, augment: bool = False, seed: int = 0) -> ImageDataset:
        """The split as an ImageDataset under the task's shift (and `data.augment` when `augment` is true)."""
        return ImageDataset(getattr(self, split), self.shifts, self.task.data.augment if augment else None, seed)


@dataclass
class TaskSequence:
    """Every task's data, the sequence's class order, and the control set (with its own label set)."""

    tasks: list[TaskData]
    labels: LabelSet  # every class of the sequence, in the order tasks first bring them
    seen: list[int]  # seen[i]: number of classes in tasks 0..i (a prefix of `labels`)
    control: TaskData | None = None
    control_labels: LabelSet | None = None

    def labels_upto(self, i: int) -> LabelSet:
        """The classes of tasks 0..i: what task i trains against and what is scored after it."""
        return prefix(self.labels, self.seen[i])

    def eval_labels(self, step: int, task: int) -> LabelSet:
        """The label set task `task` is scored against after training task `step` (see the module docstring)."""
        return self.labels_upto(max(step, task))

    def previous_classes(self, i: int) -> int:
        """Classes the model knew before task i (0 for the first task)."""
        return self.seen[i - 1] if i > 0 else 0


def prefix(labels: LabelSet, n: int) -> LabelSet:
    keys = labels.keys[:n]
    return LabelSet(keys, dict(zip(keys, labels.names[:n])), {k: labels.prompts(i) for i, k in enumerate(keys)})


def load_sequence(recipe: ContinualRecipe) -> TaskSequence:
    """Read and split each task's data once (tasks that differ only by shift share one read), number classes."""
    cache: dict[str, DataSplits] = {}
    keys: list[str] = []
    names: dict[str, str] = {}
    prompts: dict[str, list[str]] = {}
    loaded = []
    for i, task in enumerate(recipe.tasks):
        splits, classes = _task_splits(task, recipe, cache, f"tasks[{i}]")
        for key in classes:
            if key not in prompts:
                position = splits.labels.index(key)
                keys.append(key)
                names[key] = splits.labels.names[position]
                prompts[key] = splits.labels.prompts(position)
        loaded.append((task, splits, classes))
    labels = LabelSet(keys, names, prompts)
    tasks, seen, known = [], [], set()
    for task, splits, classes in loaded:
        tasks.append(_remap(task, splits, classes, labels))
        known.update(classes)
        seen.append(len(known))
    sequence = TaskSequence(tasks, labels, seen)
    if recipe.control is not None:
        splits, classes = _task_splits(recipe.control, recipe, cache, "control")
        control_labels = LabelSet(classes, {k: splits.labels.names[splits.labels.index(k)] for k in classes},
                                  {k: splits.labels.prompts(splits.labels.index(k)) for k in classes})
        sequence.control = _remap(recipe.control, splits, classes, control_labels)
        sequence.control_labels = control_labels
    return sequence


def _task_splits(task: Task, recipe: ContinualRecipe, cache: dict[str, DataSplits], where: str,
                 ) -> tuple[DataSplits, list[str]]:
    """The task's data read with the recipe's `data.classes` (its shift applied later) and the task's classes."""
    spec = dataclasses.replace(task.data, classes=recipe.recipe.data.classes, shift=())
    key = repr(to_plain(spec))
    if key not in cache:
        cache[key] = load_data(spec, recipe.seed)
    splits = cache[key]
    if not task.selects_classes:
        return splits, list(splits.labels.keys)
    classes = list(dict.fromkeys(task.data.classes or ()))
    unknown = [c for c in classes if c not in splits.labels]
    if unknown:
        raise DataError(f"{where}.classes: {unknown[0]!r} is not a class of the data"
                        f"{did_you_mean(unknown[0], splits.labels.keys)}; classes: {', '.join(splits.labels.keys)}")
    return splits, classes


def _remap(task: Task, splits: DataSplits, classes: list[str], labels: LabelSet) -> TaskData:
    """Keep the task's classes; renumber each example's label into `labels` (the sequence's class order)."""
    mapping = {splits.labels.index(key): labels.index(key) for key in classes}

    def keep(examples: list[Example]) -> list[Example]:
        return [dataclasses.replace(e, label=mapping[e.label]) for e in examples if e.label in mapping]

    shifts = parse_shift(task.data.shift)
    data = TaskData(task, classes, keep(splits.train), keep(splits.val), keep(splits.test), shifts)
    if not data.train or not data.test:
        raise DataError(f"task {task.name!r}: no {'training' if not data.train else 'test'} examples for classes "
                        f"{', '.join(classes)}")
    return data
