"""The continual recipe: an ordinary recipe plus `tasks:`, `regulariser:` and an optional `control:` set.

Each task is a partial data spec merged over the recipe's `data:` (nested mappings merge key by key), so a
class-incremental sequence is `tasks: [{classes: ["0", ..., "4"]}, {classes: ["5", ..., "9"]}]` and a
domain-incremental one is `tasks: [{shift: [rot90]}, {shift: [rot180]}]`. A task's `classes` selects its classes
from the data (it does not make other rows bad rows, as `data.classes` would); every task's data is split once with
the recipe's seed, so an image is in the same split in every task. The base recipe goes through
`mmpeft.runs.recipe.load_recipe` unchanged; the three added sections are validated here, and every problem of both is
reported in one error.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from mmpeft.core.schema import RecipeError, build, did_you_mean, to_plain
from mmpeft.data.shifts import parse_shift
from mmpeft.methods import METHODS
from mmpeft.runs.recipe import load_recipe, parse_overrides, read_yaml, resolve_presets, set_override
from mmpeft.sequences.regularisers import REGULARISERS
from mmpeft.sequences.spec import ContinualRecipe, Task
from mmpeft.specs import DataSpec, Recipe

CONTINUAL_KEYS = ("tasks", "regulariser", "control")
DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataSpec))
DEFAULT_REGULARISER = "naive"


def load_continual_recipe(source: str | Path | dict | ContinualRecipe,
                          overrides: list[str] | dict | None = None) -> ContinualRecipe:
    """YAML file or mapping (+ `key.sub=value` overrides, also `tasks.1.shift=[rot90]`) -> ContinualRecipe.

    Raises RecipeError listing every problem of the base recipe and of the continual sections at once.
    """
    if isinstance(source, ContinualRecipe):
        if not overrides:
            return source
        source = source.to_dict()
    label, base_dir = None, Path.cwd()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise RecipeError([f"recipe file not found: {path}"])
        data = read_yaml(path)
        label, base_dir = str(path), path.resolve().parent
        data.setdefault("name", path.stem)
    elif isinstance(source, dict):
        data = copy.deepcopy(source)
    else:
        raise TypeError(f"a continual recipe is a path, a mapping or a ContinualRecipe, not {type(source).__name__}")
    data = resolve_presets(data, base_dir)  # presets resolve beside the recipe file, as load_recipe does for files
    continual = {key: data.pop(key) for key in CONTINUAL_KEYS if key in data}
    problems: list[str] = []
    known = [f.name for f in dataclasses.fields(Recipe)] + list(CONTINUAL_KEYS)
    for key in [k for k in data if k not in known]:  # here, so the suggestions include the continual sections
        problems.append(f"{key}: unknown key{did_you_mean(str(key), known)}; valid keys: {', '.join(known)}")
        data.pop(key)
    base_overrides: dict[str, Any] = {}
    for key, value in parse_overrides(overrides).items():
        if key.split(".")[0] in CONTINUAL_KEYS:
            try:
                set_override(continual, key, value, _expand_regulariser)
            except RecipeError as error:
                problems.extend(error.problems)
        else:
            base_overrides[key] = value
    recipe = None
    try:
        recipe = load_recipe(data, base_overrides)
    except RecipeError as error:
        problems += error.problems
    result = _build_continual(recipe, continual, problems)
    if problems:
        raise RecipeError(problems, label)
    return result


def _build_continual(recipe: Recipe | None, continual: dict, problems: list[str]) -> ContinualRecipe | None:
    base_data = to_plain(recipe.data) if recipe is not None else None
    tasks_data = continual.get("tasks")
    tasks: list[Task] = []
    if not isinstance(tasks_data, list) or not tasks_data:
        problems.append("tasks: required, a list of at least one task (each a partial data spec, e.g. "
                        "{classes: [...]} or {shift: [rot90]}), got " + repr(tasks_data))
    else:
        for i, item in enumerate(tasks_data):
            task = _build_task(item, f"tasks[{i}]", base_data, problems, default_name=f"task{i + 1}")
            if task is not None:
                tasks.append(task)
        seen: dict[str, int] = {}
        for i, task in enumerate(tasks):
            if task.name in seen:
                problems.append(f"tasks[{i}].name: {task.name!r} is already the name of tasks[{seen[task.name]}]")
            seen.setdefault(task.name, i)
    control = None
    if continual.get("control") is not None:
        control = _build_task(continual["control"], "control", base_data, problems, default_name="control")
    regulariser = _build_regulariser(continual.get("regulariser", DEFAULT_REGULARISER), problems)
    if recipe is None or regulariser is None or not isinstance(tasks_data, list) or len(tasks) != len(tasks_data):
        return None
    result = ContinualRecipe(recipe, tuple(tasks), regulariser, control)
    problems += _check_sequence(result)
    problems += REGULARISERS.get(regulariser.name).check(result)
    return result


def _build_task(item: Any, where: str, base_data: dict | None, problems: list[str], default_name: str,
                ) -> Task | None:
    if not isinstance(item, dict):
        problems.append(f"{where}: expected a mapping of data keys (e.g. {{classes: [...]}} or {{shift: [rot90]}}), "
                        f"got {item!r}")
        return None
    changes = {k: v for k, v in item.items() if k != "name"}
    name = item.get("name", _default_name(changes, default_name))
    ok = True
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}.name: expected a non-empty string, got {name!r}")
        ok = False
    for key in changes:
        if key not in DATA_KEYS:
            problems.append(f"{where}.{key}: unknown key{did_you_mean(str(key), DATA_KEYS)}; a task takes `name` "
                            f"and data keys: {', '.join(DATA_KEYS)}")
            ok = False
    for key in ("shift", "eval_shifts"):  # the task's own shift names (the base's are checked by load_recipe)
        values = changes.get(key) or []
        for i, text in enumerate([values] if isinstance(values, str) else values):
            try:
                parse_shift(str(text))
            except ValueError as error:
                problems.append(f"{where}.{key}[{i}]: {error}")
                ok = False
    if not ok or base_data is None:
        return None
    merged = build(DataSpec, _deep_merge(base_data, changes), where, problems)
    if merged is None:
        return None
    if "classes" in changes and not merged.classes:
        problems.append(f"{where}.classes: a task that selects classes needs at least one, got {changes['classes']!r}")
    return Task(name, changes, merged)


def _default_name(changes: dict, fallback: str) -> str:
    """A readable default: the task's shift ("rot90") or its classes ("0-4" style lists are kept short)."""
    shift, classes = changes.get("shift"), changes.get("classes")
    if shift:
        return "+".join(map(str, shift)) if isinstance(shift, list) else str(shift)
    if isinstance(classes, list) and classes:
        shown = [str(c) for c in classes]
        return ",".join(shown) if len(shown) <= 4 else f"{shown[0]}..{shown[-1]}"
    return fallback


def _build_regulariser(value: Any, problems: list[str]) -> Any:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        problems.append(f"regulariser: expected a name or a mapping with `name`, got {value!r}; "
                        f"valid: {', '.join(REGULARISERS.names())}")
        return None
    name = value["name"]
    if name not in REGULARISERS:
        problems.append(f"regulariser.name: unknown regulariser {name!r}{did_you_mean(str(name), REGULARISERS.names())}"
                        f"; valid: {', '.join(REGULARISERS.names())}")
        return None
    return build(REGULARISERS.get(name).Config, value, "regulariser", problems)


def _check_sequence(recipe: ContinualRecipe) -> list[str]:
    """What a continual run cannot do, found before any model loads."""
    problems = []
    base = recipe.recipe
    if not METHODS.get(base.method.name).trains:
        problems.append(f"method.name: {base.method.name!r} trains nothing; a task sequence needs a method that "
                        f"trains (e.g. lora, full)")
    if base.train.objective != "classification":
        problems.append(f"train.objective: continual runs train and score classes ('classification'), "
                        f"got {base.train.objective!r}")
    for where, spec in [("data", base.data), *((f"tasks[{i}]", t.data) for i, t in enumerate(recipe.tasks)),
                        *((("control", recipe.control.data),) if recipe.control else ())]:
        if spec.eval_shifts:
            problems.append(f"{where}.eval_shifts: not used by continual runs (each task's own test split is "
                            f"evaluated after every task); add a task or a `control:` set instead")
    return list(dict.fromkeys(problems))


def _deep_merge(base: dict, changes: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _expand_regulariser(path: list[str], name: str) -> Any:
    """`regulariser: ewc` written as a name, then a setting overridden."""
    return {"name": name} if path[-1] == "regulariser" else name
