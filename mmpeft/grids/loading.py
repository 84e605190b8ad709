"""Grid recipes: an ordinary (or continual) recipe plus a `grid:` section, validated before any run.

`grid.kind` says which kind of grid it is (mmpeft.grids.base.GRID_KINDS: methods, fewshot, regularisers); left out,
it comes from the command (`mmpeft compare` -> methods, `mmpeft fewshot` -> fewshot). The kind is never guessed
from the recipe's other keys: a `tasks:` recipe or a `grid.regularisers` list without `kind: regularisers` is an
error that says so. The executor keys (grid.executor, ...) are checked here for every kind.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

from mmpeft.core.schema import RecipeError, build, did_you_mean
from mmpeft.grids.base import COMMAND_KINDS, EXECUTORS, GRID_KINDS, Cell, GridSpec, kind_of
from mmpeft.runs.recipe import parse_overrides, read_yaml, set_override


def load_setup(source: str | Path | dict, overrides: list[str] | dict | None = None, command: str = "compare") -> Any:
    """Parse, split off `grid:`, pick the kind (declared, else the command's) and let it validate the rest."""
    data, grid_data, rest, base_dir, label = read_with_section(source, overrides, "grid")
    if "search" in data:  # what `mmpeft search` pops before it loads the rest as a grid
        raise RecipeError([f"search: this is a search recipe; run it with `mmpeft search`, not `mmpeft {command}`"],
                          label)
    problems: list[str] = []
    kind = grid_kind(data, grid_data, command, problems)
    if kind is None:
        raise RecipeError(problems, label)
    if grid_data is not None:
        grid_data = {**grid_data, "kind": kind} if isinstance(grid_data, dict) else grid_data
    return GRID_KINDS.get(kind)().load_setup(data, grid_data, rest, base_dir, label, command, problems)


def read_with_section(source: str | Path | dict, overrides: list[str] | dict | None, section: str
                      ) -> tuple[dict, Any, dict[str, Any], Path, str | None]:
    """(the recipe without `section`, that section with its overrides applied, the other overrides, the folder
    relative paths start from, the file's name for messages)."""
    label, base_dir = None, Path.cwd()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise RecipeError([f"recipe file not found: {path}"])
        data, label, base_dir = read_yaml(path), str(path), path.resolve().parent
        data.setdefault("name", path.stem)
    else:
        data = copy.deepcopy(source)
    part = data.pop(section, None)
    rest: dict[str, Any] = {}
    for key, value in parse_overrides(overrides).items():
        if key == section or key.startswith(f"{section}."):
            holder = {section: part if isinstance(part, dict) else {}}
            set_override(holder, key, value)
            part = holder[section]
        else:
            rest[key] = value
    return data, part, rest, base_dir, label


def grid_kind(data: dict, grid_data: Any, command: str, problems: list[str]) -> str | None:
    """The declared grid.kind (else the command's), checked against the recipe; None with problems when wrong."""
    declared = grid_data.get("kind") if isinstance(grid_data, dict) else None
    kind = COMMAND_KINDS.get(command, "methods") if declared is None else declared
    if kind not in GRID_KINDS:
        problems.append(f"grid.kind: unknown grid kind {kind!r}{did_you_mean(str(kind), GRID_KINDS.names())}; "
                        f"valid: {', '.join(GRID_KINDS.names())}")
        return None
    regularisers = isinstance(grid_data, dict) and grid_data.get("regularisers")
    if kind != "regularisers" and ("tasks" in data or regularisers):
        what = "a `tasks:` sequence (a continual recipe)" if "tasks" in data else "a grid.regularisers list"
        problems.append(f"grid.kind: this recipe has {what}, which a {kind} grid does not use; to compare "
                        "regularisers over the task sequence add `grid.kind: regularisers` (see "
                        "recipes/compare-regularisers.yaml)")
        return None
    if command not in GRID_KINDS.get(kind).commands:
        problems.append(f"grid.kind: a {kind} grid runs with `mmpeft {GRID_KINDS.get(kind).commands[0]}`, not "
                        f"`mmpeft {command}`")
    return kind


def load_grid_spec(grid_data: Any, command: str, problems: list[str], example: str) -> GridSpec | None:
    """grid: as a GridSpec (None with problems when missing or wrong), its executor keys checked too."""
    if grid_data is None:
        problems.append(f"grid: required in a {command} recipe, e.g. grid: {example}")
        return None
    grid = build(GridSpec, grid_data, "grid", problems)
    if grid is not None:
        problems += executor_problems(grid)
    return grid


def executor_problems(grid: GridSpec) -> list[str]:
    """grid.executor and the per-cell resources, before anything runs."""
    problems = []
    if isinstance(grid.executor, str) and grid.executor not in EXECUTORS:  # not a string: the schema said so
        problems.append(f"grid.executor: {grid.executor!r} is not an executor{did_you_mean(grid.executor, EXECUTORS)}"
                        f"; valid: {', '.join(EXECUTORS)}")
    if grid.executor == "ray" and importlib.util.find_spec("ray") is None:
        problems.append("grid.executor: ray needs the Ray package, which is not installed: pip install 'mmpeft[ray]'")
    for key in ("cpus_per_cell", "gpus_per_cell"):  # their ranges are in GridSpec
        value = getattr(grid, key)
        if grid.executor == "processes" and value != int(value):
            problems.append(f"grid.{key}: {value} is a fraction; the processes executor gives whole CPUs/GPUs to a "
                            "cell (use grid.executor: ray for fractions)")
    if grid.ray_address is not None and grid.executor != "ray":
        problems.append(f"grid.ray_address: set, but grid.executor is {grid.executor!r}; add grid.executor: ray")
    return problems


def plan_cells(setup: Any, grid_dir: Path) -> list[Cell]:
    """Every cell of a loaded grid setup, in results order."""
    return kind_of(setup).plan_cells(setup, grid_dir)


def load_compare_recipe(source: str | Path | dict, overrides: list[str] | dict | None = None) -> tuple[GridSpec, Any]:
    """A compare recipe -> (GridSpec, the shared recipe: a ContinualRecipe for a regularisers grid); every problem
    of both reported at once (RecipeError)."""
    setup = load_setup(source, overrides)
    return setup.grid, setup.recipe


def load_fewshot_recipe(source: str | Path | dict, overrides: list[str] | dict | None = None) -> tuple[GridSpec, Any]:
    """As load_compare_recipe, with grid.kind defaulting to fewshot (grid.shots to 1, 2, 4, 8, 16)."""
    setup = load_setup(source, overrides, command="fewshot")
    return setup.grid, setup.recipe

