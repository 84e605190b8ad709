"""The one protocol every grid kind follows, and the registry that names them (`grid.kind` in a recipe).

A grid is an axis of entries (methods, regularisers, ...) x seeds [x shots] over one shared recipe; every cell is an
ordinary run folder under <grid>/cells/. What differs between kinds is how the setup is read, which cells exist, how
one cell runs, its results row and the report; the rest (skipping finished cells, failures, resume, executors) is
written once in mmpeft.grids.cells and mmpeft.grids.runner. A new kind is one file with a registered GridKind
subclass plus one import line in mmpeft/grids/__init__.py.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from mmpeft.core.registry import Registry
from mmpeft.core.schema import Range, did_you_mean
from mmpeft.specs import Positive, Seed

GRID_RECIPE = "compare.yaml"  # the resolved grid recipe in the grid folder; `--resume` reloads it
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # labels name cell folders
COMMAND_KINDS = {"compare": "methods", "fewshot": "fewshot"}  # grid.kind when the recipe leaves it out
EXECUTORS = ("sequential", "processes", "ray")


@dataclass(frozen=True)
class GridSpec:
    kind: str | None = None  # methods | fewshot | regularisers; None: from the command (compare/fewshot)
    methods: tuple[str | dict[str, Any], ...] = ()  # names, presets, or mappings with name/preset (+ label, train)
    seeds: tuple[Seed, ...] = (0, 1, 2)
    # k per class; None: every cell uses data.shots (all examples by default); 0: fewshot's in-context row
    shots: tuple[Annotated[int, Range(ge=0)], ...] | None = None
    baseline: str | None = None  # paired tests against this label; default: the entry running `full` (or `naive`)
    templates: tuple[str, ...] = ()  # zero-shot prompts: templates with {label} or built-in set names; () = recipe's
    regularisers: tuple[str | dict[str, Any], ...] = ()  # regularisers grids: the axis instead of methods
    strategies: tuple[str, ...] | None = None  # fewshot, generative: in-context demo strategies; None = all of them
    executor: str = "sequential"  # sequential (this process) | processes (a local pool) | ray
    max_parallel: Positive | None = None  # cells at once; None: as many as the resources allow
    threads_per_cell: Positive = 1  # torch threads of each cell in a worker (processes, ray)
    # CPU slots a cell takes (processes: whole slots; ray: its num_cpus)
    cpus_per_cell: Annotated[float, Range(gt=0)] = 1.0
    # GPUs a cell takes where there are GPUs (processes: whole GPUs; ray: fractions too)
    gpus_per_cell: Annotated[float, Range(gt=0)] = 1.0
    ray_address: str | None = None  # None: a local Ray; `auto` or host:port joins a running cluster


@dataclass(frozen=True)
class Cell:
    """One run of the grid: the same values whoever runs it (so any executor gives the same metrics)."""

    name: str  # its folder under cells/ and its row's `cell`
    label: str  # the axis entry it runs (a method or regulariser label)
    seed: int
    shots: int | None
    recipe: Any  # a Recipe, or a ContinualRecipe for a regularisers grid
    dir: Path


class GridKind(ABC):
    """What a kind of grid decides; instances hold no state, so a worker process can make its own."""

    name: ClassVar[str]
    commands: ClassVar[tuple[str, ...]] = ("compare", "fewshot")  # commands that may run this kind
    refuse_started_cells: ClassVar[bool] = False  # True: a started (not only finished) cell must match the plan
    ignored_settings: ClassVar[tuple[str, ...]] = ()  # top-level recipe keys not compared against a saved cell

    @abstractmethod
    def load_setup(self, data: dict, grid_data: Any, overrides: dict[str, Any], base_dir: Path, label: str | None,
                   command: str, problems: list[str]) -> Any:
        """The validated setup (its `grid.kind` is this kind's name); every problem (`problems` holds those found
        so far) in one RecipeError."""

    @abstractmethod
    def plan_cells(self, setup: Any, grid_dir: Path) -> list[Cell]:
        """Every cell, in the order results are listed."""

    @abstractmethod
    def execute(self, cell: Cell, resume: bool) -> dict:
        """Run one cell into cell.dir (continuing its checkpoint when `resume`) and return its metrics."""

    @abstractmethod
    def cell_row(self, cell: Cell, metrics: dict | None) -> dict:
        """One results row; metrics None (a failed cell) leaves the numbers empty."""

    @abstractmethod
    def columns(self, setup: Any, context: dict) -> dict[str, str]:
        """The results columns, with what each holds."""

    @abstractmethod
    def setup_yaml(self, setup: Any, grid_dir: Path) -> str:
        """The resolved recipe saved as <grid>/compare.yaml, every entry spelt out."""

    @abstractmethod
    def write_report(self, setup: Any, grid_dir: Path, cells: list[Cell], rows: list[dict], context: dict) -> dict:
        """summary/plots/report.md from every row; returns what compare() returns."""

    @abstractmethod
    def trained_recipes(self, setup: Any) -> list[tuple[str, Any]]:
        """(label, Recipe or ContinualRecipe) per distinct training setup: what the planner sizes."""

    def check(self, setup: Any) -> dict:
        """Checks that need more than the recipe (the backbone's family, ...), before anything is written; returns
        what begin() and write_report() are told (the run's context)."""
        return {}

    def begin(self, setup: Any, grid_dir: Path, context: dict) -> dict:
        """Baselines and rows that come before the cells (the context's `rows`), run by the driver."""
        return context

    def checkpoint(self, cell: Cell) -> Path | None:
        """A file that says the unfinished cell can continue where it stopped (None: the kind resumes by itself)."""
        return None

    def shown(self, row: dict) -> str:
        """The line printed when a finished cell's row comes in."""
        return "ok"


GRID_KINDS: Registry[type[GridKind]] = Registry("grid kind")


def kind_of(setup: Any) -> GridKind:
    """The kind object a loaded setup was made by (its grid.kind, always set after loading)."""
    return GRID_KINDS.get(setup.grid.kind)()


def label_problems(where: str, label: str) -> list[str]:
    """A grid entry's label names its cell folders: letters, digits, '.', '_' or '-' only."""
    if LABEL_PATTERN.match(label):
        return []
    return [f"{where}: label {label!r} must be letters, digits, '.', '_' or '-' (it names folders)"]


def resolved_yaml(data: dict, command: str, grid_dir: Path, spelt_out: str) -> str:
    """The resolved grid recipe saved as GRID_RECIPE: `mmpeft <command> --resume <grid_dir>` reloads it."""
    import yaml

    data = {**data, "output": {"dir": str(grid_dir.parent), "name": grid_dir.name}}
    head = f"# mmpeft {command} --resume {grid_dir}\n# resolved: every default filled in, {spelt_out} spelt out\n"
    return head + yaml.safe_dump(data, sort_keys=False)


def seed_problems(grid: GridSpec) -> list[str]:
    if not grid.seeds:
        return ["grid.seeds: list at least one seed"]
    if len(set(grid.seeds)) != len(grid.seeds):
        return [f"grid.seeds: {list(grid.seeds)} repeats a seed"]
    return []


def pick_baseline(grid: GridSpec, entries: tuple, problems: list[str], axis: str = "methods",
                  default: str = "full") -> str | None:
    """grid.baseline, else the entry whose config runs `default`: what every other entry is tested against."""
    labels = [e.label for e in entries]
    if grid.baseline is not None:
        if grid.baseline not in labels:
            problems.append(f"grid.baseline: {grid.baseline!r} is not a label of grid.{axis}"
                            f"{did_you_mean(grid.baseline, labels)}; labels: {', '.join(labels)}")
        return grid.baseline
    return next((e.label for e in entries if e.config.name == default), None)


def differences(old: object, new: object, path: str = "") -> list[str]:
    """`key.path: old -> new` for every leaf that differs between two plain dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in dict.fromkeys([*old, *new]):
            found += differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return found
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]
