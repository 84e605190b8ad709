"""`grid.kind: regularisers` (`mmpeft compare`): regularisers x seeds over a continual recipe, one task sequence per
cell, one table.

A compare recipe whose recipe part has `tasks:` takes `grid: {kind: regularisers, regularisers: [naive, ewc, lwf,
replay], seeds: [0, 1]}`.
An entry is a regulariser name (its config's defaults) or a mapping `{name: ewc, strength: 30, label: ewc-30}`; the
recipe's own `method:` trains under every one. Each cell is an ordinary continual run folder made by
mmpeft.sequences (cells/<recipe name>-<label>-seed<s>/): a finished one is reused, an interrupted one continues at
its task, a failed one is recorded with its error and retried when the grid runs again (mmpeft.grids.cells).

Seeds: a continual recipe splits its tasks' data with `data.split.seed`, else with the recipe's seed; pin
`data.split.seed` to keep one split for every seed. Either way every regulariser of one seed shares the split, the
method's initialisation and the batch order, which is what makes the paired test against `naive` a fair one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mmpeft.core.schema import RecipeError, build, did_you_mean, to_plain
from mmpeft.grids.base import (
    GRID_KINDS,
    Cell,
    GridKind,
    GridSpec,
    label_problems,
    pick_baseline,
    resolved_yaml,
    seed_problems,
)
from mmpeft.grids.loading import load_grid_spec
from mmpeft.runs.folder import METRICS_FILE, RECIPE_FILE
from mmpeft.runs.recipe import resolve_presets
from mmpeft.sequences.tasks import ContinualRecipe, load_continual_recipe

logger = logging.getLogger("mmpeft")

# The columns of a regularisers grid's results.csv / results.json, with what each holds.
COLUMNS = {
    "cell": "cell folder under cells/ (an ordinary continual run folder)",
    "regulariser": "grid label of the regulariser",
    "regulariser_name": "registered regulariser the label runs",
    "method": "the recipe's method, trained on every task under the regulariser",
    "seed": "seed of the cell (initialisation, batch order, the regulariser's draws; the split unless "
            "data.split.seed pins it)",
    "status": "ok or failed",
    "average_accuracy": "mean over tasks of the final model's test accuracy (mean_j R[T-1][j])",
    "average_forgetting": "mean over tasks j < T-1 of max_l R[l][j] - R[T-1][j]; lower is better",
    "backward_transfer": "mean over tasks j < T-1 of R[T-1][j] - R[j][j]; negative = forgetting",
    "forward_transfer": "mean over tasks j >= 1 of R[j-1][j] - zero-shot accuracy on j (empty without zero-shot)",
    "average_incremental_accuracy": "mean over steps i of the mean accuracy on tasks 0..i",
    "final_control_accuracy": "accuracy on the control set (never trained on) after the last task",
    "trainable_params": "parameters with requires_grad after the method was applied",
    "train_seconds": "wall seconds of the training loops, summed over tasks",
    "error": "why a failed cell failed (full traceback in cells/<cell>/error.txt)",
}
SUMMARY_KEYS = ("average_accuracy", "average_forgetting", "backward_transfer", "forward_transfer",
                "average_incremental_accuracy", "final_control_accuracy")
UNUSED_GRID_KEYS = {"shots": None, "templates": (), "strategies": None}  # methods-grid keys: value when left out


@dataclass(frozen=True)
class RegulariserEntry:
    label: str  # names the cells and the table rows
    config: Any  # the regulariser's validated config dataclass
    source: str  # "defaults of <Config>" or "inline"

    @property
    def settings(self) -> dict:
        """The entry as run_continual_cell takes it: name, settings and label."""
        return {**to_plain(self.config), "label": self.label}


@dataclass(frozen=True)
class RegulariserSetup:
    grid: GridSpec
    recipe: ContinualRecipe  # what every cell shares; its own regulariser is a placeholder (naive)
    regularisers: tuple[RegulariserEntry, ...]
    baseline: str | None
    command: str = "compare"

    @property
    def split_seed(self) -> int | None:
        """The split every cell shares, or None when each seed draws its own."""
        return self.recipe.recipe.data.split.seed


def load_regulariser_setup(data: dict, grid_data: Any, overrides: dict[str, Any], base_dir: Path,
                           label: str | None, command: str, problems: list[str]) -> RegulariserSetup:
    """Validate the continual recipe and every `grid.regularisers` entry; every problem reported at once."""
    grid = load_grid_spec(grid_data, command, problems, "{kind: regularisers, regularisers: [naive, ewc, lwf, "
                          "replay], seeds: [0, 1]}")
    if grid is not None:
        problems += grid_axis_problems(grid)
    if "tasks" not in data:
        problems.append("grid.regularisers: needs a continual recipe, one with `tasks:` (see "
                        "recipes/continual-ewc.yaml); this recipe has none, so there is no sequence to forget")
        raise RecipeError(problems, label)
    if "regulariser" in data:
        data.pop("regulariser")
        problems.append("regulariser: a regularisers grid takes each regulariser from grid.regularisers; move these "
                        "settings into an entry (e.g. {name: replay, memory_size: 200}) and remove the top-level "
                        "`regulariser`")
    for key in [k for k in overrides if k.split(".")[0] == "regulariser"]:
        overrides.pop(key)
        problems.append(f"override {key}: a regularisers grid takes its regularisers from grid.regularisers "
                        "(for example grid.regularisers=[naive,ewc])")
    recipe = None
    try:
        recipe = load_continual_recipe(resolve_presets(data, base_dir), overrides)
    except RecipeError as error:
        problems += error.problems
    entries: tuple[RegulariserEntry, ...] = ()
    baseline = None
    if grid is not None:
        entries = resolve_regularisers(grid, recipe, problems)
        baseline = pick_baseline(grid, entries, problems, axis="regularisers", default="naive")
    if problems or recipe is None or grid is None:
        raise RecipeError(problems, label)
    return RegulariserSetup(grid, recipe, entries, baseline, command)


def grid_axis_problems(grid: GridSpec) -> list[str]:
    """One axis per grid, and only the keys a regularisers grid uses."""
    problems = seed_problems(grid)
    if grid.methods and grid.regularisers:
        problems.append("grid: lists both `methods` and `regularisers`; a grid has one axis: `methods` compares "
                        "methods on an ordinary recipe, `regularisers` compares regularisers under a continual "
                        "recipe's `method:`; remove one of them")
    elif not grid.regularisers:
        problems.append("grid.regularisers: a continual recipe (it has `tasks:`) compares regularisers; list them, "
                        "e.g. regularisers: [naive, ewc, lwf, replay]"
                        + ("; grid.methods over a task sequence is not supported" if grid.methods else ""))
    for key, unset in UNUSED_GRID_KEYS.items():
        if getattr(grid, key) != unset:
            problems.append(f"grid.{key}: not used by a regularisers grid (each task's data spec says what it trains "
                            "and tests on); remove it")
    return problems


def resolve_regularisers(grid: GridSpec, recipe: ContinualRecipe | None, problems: list[str],
                         ) -> tuple[RegulariserEntry, ...]:
    """Each entry -> a validated regulariser config, checked against the sequence (when the recipe is valid)."""
    from mmpeft.sequences.regularisers import REGULARISERS

    entries = []
    for i, entry in enumerate(grid.regularisers):
        where = f"grid.regularisers[{i}]"
        if not isinstance(entry, (str, dict)):
            continue  # build(GridSpec) said what it should be
        mapping = {"name": entry} if isinstance(entry, str) else dict(entry)
        label = mapping.pop("label", None)
        name = mapping.get("name")
        if name is None:
            problems.append(f"{where}: a mapping entry needs `name` (a regulariser), got keys {sorted(mapping)}")
            continue
        if name not in REGULARISERS:
            problems.append(f"{where}: unknown regulariser {name!r}{did_you_mean(str(name), REGULARISERS.names())}; "
                            f"valid: {', '.join(REGULARISERS.names())}")
            continue
        label = str(label or name)
        problems += label_problems(where, label)
        config = build(REGULARISERS.get(name).Config, mapping, where, problems)
        if config is None:
            continue
        if recipe is not None:
            for problem in REGULARISERS.get(name).check(recipe.replace(regulariser=config)):
                problems.append(problem.replace("regulariser", where, 1) if problem.startswith("regulariser")
                                else f"{where}: {problem}")
        source = "inline" if len(mapping) > 1 else f"defaults of {type(config).__name__}"
        entries.append(RegulariserEntry(label, config, source))
    labels = [e.label for e in entries]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(f"grid.regularisers: label {label!r} appears {labels.count(label)} times; give entries "
                        "distinct `label:`s (e.g. {name: ewc, strength: 100, label: ewc-100})")
    return tuple(entries)


@GRID_KINDS.register("regularisers")
class RegularisersKind(GridKind):
    name: ClassVar[str] = "regularisers"
    commands: ClassVar[tuple[str, ...]] = ("compare",)
    refuse_started_cells: ClassVar[bool] = True  # a started sequence resumes at its task: it must match the plan
    ignored_settings: ClassVar[tuple[str, ...]] = ("output",)  # where the folder is, not how it trains

    def load_setup(self, data: dict, grid_data: Any, overrides: dict[str, Any], base_dir: Path, label: str | None,
                   command: str, problems: list[str]) -> RegulariserSetup:
        return load_regulariser_setup(data, grid_data, overrides, base_dir, label, command, problems)

    def plan_cells(self, setup: RegulariserSetup, grid_dir: Path) -> list[Cell]:
        """Seeds before regularisers, so an interrupted grid holds complete seeds."""
        from mmpeft.sequences.runner import plan_continual_cell

        cells = []
        for seed in setup.grid.seeds:
            for entry in setup.regularisers:
                _, recipe, run_dir = plan_continual_cell(setup.recipe, entry.settings, seed, grid_dir / "cells")
                cells.append(Cell(run_dir.name, entry.label, seed, None, recipe, run_dir))
        return cells

    def execute(self, cell: Cell, resume: bool) -> dict:
        """One task sequence; an interrupted one (its recipe.yaml is there) continues at its task."""
        from mmpeft.sequences import continual

        return continual(cell.recipe, resume=cell.dir if (cell.dir / RECIPE_FILE).is_file() else None)

    def cell_row(self, cell: Cell, metrics: dict | None) -> dict:
        row = {"cell": cell.name, "regulariser": cell.label, "regulariser_name": cell.recipe.regulariser.name,
               "method": cell.recipe.recipe.method.name, "seed": cell.seed, "status": "ok", "error": ""}
        if metrics is None:
            return row
        row.update({key: metrics["summary"].get(key) for key in SUMMARY_KEYS})
        row["trainable_params"] = metrics.get("params", {}).get("trainable")
        row["train_seconds"] = round(sum(task.get("seconds", 0.0) for task in metrics.get("train", [])), 3)
        return row

    def shown(self, row: dict) -> str:
        forgetting = row["average_forgetting"]
        return (f"average accuracy {row['average_accuracy']:.4f}, forgetting "
                f"{'n/a' if forgetting is None else f'{forgetting:.4f}'}")

    def columns(self, setup: RegulariserSetup, context: dict) -> dict[str, str]:
        return COLUMNS

    def setup_yaml(self, setup: RegulariserSetup, grid_dir: Path) -> str:
        """The resolved compare recipe saved in the grid folder: `--resume` reloads it, regularisers spelt out."""
        data = setup.recipe.to_dict()
        data.pop("regulariser")
        grid = {key: value for key, value in to_plain(setup.grid).items() if key not in ("methods", *UNUSED_GRID_KEYS)}
        data["grid"] = {**grid, "regularisers": [{"label": e.label, **to_plain(e.config)} for e in setup.regularisers]}
        return resolved_yaml(data, setup.command, grid_dir, "regularisers")

    def begin(self, setup: RegulariserSetup, grid_dir: Path, context: dict) -> dict:
        logger.info("compare grid %s: %d cells (%d regularisers x %d seeds), method %s", grid_dir,
                    len(setup.regularisers) * len(setup.grid.seeds), len(setup.regularisers),
                    len(setup.grid.seeds), setup.recipe.recipe.method.name)
        return context

    def write_report(self, setup: RegulariserSetup, grid_dir: Path, cells: list[Cell], rows: list[dict],
                     context: dict) -> dict:
        from mmpeft.report.regulariser_report import summarize_regularisers, summary_json, write_regulariser_report

        groups = summarize_regularisers(rows, [e.label for e in setup.regularisers], setup.baseline)
        write_regulariser_report(grid_dir, setup, rows, groups, first_metrics(cells, rows))
        failed = [r for r in rows if r["status"] != "ok"]
        print(f"{setup.command}: {len(rows) - len(failed)}/{len(rows)} cells ok; table and plot in "
              f"{grid_dir / 'report.md'}", flush=True)
        return {"dir": str(grid_dir), "rows": rows, "summary": summary_json(groups)}

    def trained_recipes(self, setup: RegulariserSetup) -> list[tuple[str, Any]]:
        """One method, trained under every regulariser: one sequence per entry (their held state differs)."""
        method = setup.recipe.recipe.method.name
        return [(f"{method} + {entry.label}", setup.recipe.replace(regulariser=entry.config))
                for entry in setup.regularisers]


def first_metrics(cells: list[Cell], rows: list[dict]) -> dict | None:
    """metrics.json of the first finished cell: the sequence's tasks, protocol and zero-shot accuracies."""
    by_name = {row["cell"]: row for row in rows}
    for cell in cells:
        if by_name.get(cell.name, {}).get("status") == "ok":
            return json.loads((cell.dir / METRICS_FILE).read_text())
    return None
