"""`mmpeft check`: any recipe (a run, a grid, a continual sequence) validated and resolved, without loading a model.

The command line and the web UI both call `check_recipe`, so they cannot disagree. Which command runs a recipe is
declared, never guessed from comments: a recipe with `search:` runs as `search`, one with `grid:` as its
`grid.kind`'s command (`compare` when the kind is left out; `mmpeft fewshot` for a fewshot grid), one with `tasks:`
as `continual`, anything else as `run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmpeft.core.schema import to_plain
from mmpeft.data import DataError, read_rows
from mmpeft.data.conversation_data import CONVERSATION_SOURCES, load_conversations
from mmpeft.grids import GRID_KINDS, load_compare_recipe, load_fewshot_recipe
from mmpeft.grids.base import COMMAND_KINDS
from mmpeft.grids.search_space import load_search_setup
from mmpeft.methods import METHODS
from mmpeft.runs.recipe import load_recipe, read_yaml
from mmpeft.runs.single import unlabelled_message
from mmpeft.sequences.tasks import load_continual_recipe
from mmpeft.specs import Recipe


@dataclass(frozen=True)
class CheckedRecipe:
    command: str  # what runs it: run | compare | fewshot | continual | search
    resolved: dict  # the recipe with every default filled in
    name: str
    output_name: str | None
    notes: str = ""  # what checking the data found (conversation rows)


def recipe_command(data: dict) -> str:
    """The command that runs a recipe mapping (see the module docstring)."""
    if "search" in data:
        return "search"
    if "grid" in data:
        kind = data["grid"].get("kind") if isinstance(data["grid"], dict) else None
        if kind not in GRID_KINDS:
            return "compare"  # no kind (compare's default) or an unknown one (the grid loader names it)
        default_for = {grid_kind: command for command, grid_kind in COMMAND_KINDS.items()}
        return default_for.get(kind, GRID_KINDS.get(kind).commands[0])
    return "continual" if "tasks" in data else "run"


def check_recipe(path: str | Path, overrides: list[str] | None = None) -> CheckedRecipe:
    """Validate the recipe file at `path` as its command would (raises RecipeError, DataError, FileNotFoundError)."""
    path, overrides = Path(path), list(overrides or [])
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    command = recipe_command(read_yaml(path))  # read_yaml names the file in any YAML problem
    if command == "continual":
        continual = load_continual_recipe(path, overrides)
        recipe = continual.recipe
        resolved = {**recipe.to_dict(), "tasks": to_plain(continual.tasks),
                    "regulariser": to_plain(continual.regulariser), "control": to_plain(continual.control)}
        return CheckedRecipe(command, resolved, recipe.name, recipe.output.name)
    if command == "search":
        setup = load_search_setup(path, overrides)
        return CheckedRecipe(command, setup.resolved(), setup.compare.recipe.name, setup.compare.recipe.output.name)
    if command != "run":
        grid, recipe = (load_fewshot_recipe if command == "fewshot" else load_compare_recipe)(path, overrides)
        resolved = recipe.to_dict()
        if grid.kind == "regularisers":  # the continual recipe's own regulariser is a placeholder: the grid names them
            resolved.pop("regulariser", None)
        return CheckedRecipe(command, {**resolved, "grid": to_plain(grid)}, recipe.name, recipe.output.name)
    recipe = load_recipe(path, overrides)
    return CheckedRecipe(command, recipe.to_dict(), recipe.name, recipe.output.name, data_notes(recipe))


def data_notes(recipe: Recipe) -> str:
    """The data read as `run` reads it: conversations every row checked; labelled, caption and shard sources their
    rows listed (a pattern matching no shard, a missing column or a leaking held-out table fails here), without
    decoding images; digits and streams are left to the run."""
    spec = recipe.data
    if spec.source in CONVERSATION_SOURCES:
        return conversation_notes(recipe)
    if spec.source == "digits" or spec.stream:
        return ""
    raw = read_rows(spec)
    if not raw.rows:
        raise DataError(f"no rows found in {raw.where} (data.source: {spec.source})")
    if not raw.labelled and recipe.train.objective != "contrastive" and METHODS.get(recipe.method.name)().trains:
        raise DataError(unlabelled_message({"where": raw.where}, recipe))  # as `run` refuses it, before any model
    classes = len({row.label for row in raw.rows if row.label is not None})
    held_out = f" (+ {len(raw.held_out)} held out)" if raw.held_out else ""
    what = f"{classes} classes" if raw.labelled else "captions only"
    return f"# data: {len(raw.rows)} rows{held_out} in {raw.where}, {what}; images are checked when the run starts\n"


def conversation_notes(recipe: Recipe) -> str:
    """Conversation data (llava, sharegpt, messages, llamafactory): every row checked too, as `run` would."""
    info = load_conversations(recipe.data, recipe.seed).info
    counts = ", ".join(f"{split} {n}" for split, n in info["counts"].items())
    return (f"# data: {counts} rows ({info['turns']['assistant']} assistant turns, {info['images']['total']} images); "
            f"{info['skipped']} bad rows skipped\n")
