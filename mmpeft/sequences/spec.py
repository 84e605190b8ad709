"""A validated continual recipe as data: its tasks, regulariser config and control set (loading: tasks.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml

from mmpeft.core.schema import to_plain
from mmpeft.specs import DataSpec, Recipe


@dataclass(frozen=True)
class Task:
    """One step of the sequence: its name, its changes to `data:` as written, and the merged data spec."""

    name: str
    changes: dict
    data: DataSpec

    @property
    def selects_classes(self) -> bool:
        """True when the task names its own classes (class-incremental): a subset of the data's classes."""
        return "classes" in self.changes

    def to_dict(self) -> dict:
        merged = to_plain(self.data)
        return {"name": self.name, **{key: merged[key] for key in self.changes}}


@dataclass(frozen=True)
class ContinualRecipe:
    """A validated continual recipe. `recipe` is the ordinary recipe (backbone, method, train, eval, output)."""

    recipe: Recipe
    tasks: tuple[Task, ...]
    regulariser: Any  # the regulariser's own config dataclass (see mmpeft.sequences.regularisers)
    control: Task | None = None

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def output(self):
        return self.recipe.output

    def to_dict(self) -> dict:
        data = self.recipe.to_dict()
        data["tasks"] = [task.to_dict() for task in self.tasks]
        data["regulariser"] = to_plain(self.regulariser)
        if self.control is not None:
            data["control"] = self.control.to_dict()
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> "ContinualRecipe":
        return dataclasses.replace(self, **changes)
