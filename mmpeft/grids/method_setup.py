"""The setup of a methods grid (`grid.kind: methods` or `fewshot`): the shared recipe and every grid.methods entry.

A grid entry is a method name, a preset (file or name in adapters/), or a mapping (`{preset: lora-r8, r: 16, label:
lora-r16}` or `{name: lora, towers: [text]}`); a mapping's `train:` changes the shared budget for that method only
(typically its learning rate: a 650-parameter probe and full fine-tuning do not share a good one), and the report
lists every such change. A bare method name runs its preset from adapters/ where the method has
one (DEFAULT_PRESETS, then adapters/<name>.yaml), else the defaults of the method's config dataclass; the report
states which for every entry.

Every cell shares one split, fixed by `data.split.seed` (default: the recipe's top-level `seed`); `grid.seeds` vary
the method's initialisation, the batch order and, with shots, the k-shot sample (nested in k, the same for every
method at a given seed and k). So differences between cells of one seed and k come from the method alone.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpeft.core.io import PROJECT_ROOT
from mmpeft.core.schema import RecipeError, build, did_you_mean, show, to_plain
from mmpeft.grids.base import GridSpec, label_problems, pick_baseline, seed_problems
from mmpeft.runs.recipe import load_recipe, preset_candidates, read_yaml
from mmpeft.specs import DataSpec, Recipe, TrainSpec, template_problem

FEWSHOT_SHOTS = (1, 2, 4, 8, 16)
# A bare name in grid.methods -> the preset it runs (when the file exists in adapters/). Names not listed here try
# adapters/<name>.yaml (full, ia3, bitfit), then fall back to the method config's dataclass defaults.
DEFAULT_PRESETS = {"lora": "lora-r8", "dora": "dora-r8", "rslora": "rslora-r8", "bottleneck": "houlsby",
                   "coop": "coop-16", "vpt": "vpt-8", "linear_probe": "linear-probe"}


@dataclass(frozen=True)
class MethodEntry:
    label: str  # names the cells and the table rows
    config: Any  # the method's validated config dataclass
    source: str  # where its settings came from: a preset file, "defaults of <Config>", or "inline"
    train_changes: dict[str, Any] = dataclasses.field(default_factory=dict)  # this method's `train:` keys


@dataclass(frozen=True)
class CompareSetup:
    grid: GridSpec
    recipe: Recipe  # the part every cell shares; its method is a zero_shot placeholder
    methods: tuple[MethodEntry, ...]
    baseline: str | None
    command: str = "compare"

    @property
    def split_seed(self) -> int:
        seed = self.recipe.data.split.seed
        return self.recipe.seed if seed is None else seed




def load_methods_setup(data: dict, grid: GridSpec | None, overrides: dict[str, Any], base_dir: Path,
                       label: str | None, command: str, problems: list[str]) -> CompareSetup:
    """Validate the recipe part (its method a zero_shot placeholder) and every grid.methods entry, all at once."""
    for key in [k for k in overrides if k == "method" or k.startswith("method.")]:
        overrides.pop(key)
        problems.append(f"override {key}: a {command} recipe takes its methods from grid.methods "
                        "(for example grid.methods=[full,lora])")
    if "method" in data:
        problems.append(f"method: a {command} recipe takes its methods from grid.methods; remove the top-level "
                        "`method` (or move it into grid.methods)")
    try:
        recipe = load_recipe({**data, "method": "zero_shot"}, overrides)
    except RecipeError as error:
        problems += error.problems
        recipe = None
    entries: tuple[MethodEntry, ...] = ()
    baseline = None
    if grid is not None:
        if grid.kind == "fewshot" and grid.shots is None:
            grid = dataclasses.replace(grid, shots=FEWSHOT_SHOTS)
        problems += grid_problems(grid, command)
        if recipe is not None and grid.shots is not None and recipe.data.shots is not None:
            problems.append(f"data.shots: {recipe.data.shots} conflicts with grid.shots {list(grid.shots)}; "
                            "a grid takes k from grid.shots: remove data.shots")
        entries = resolve_methods(grid, recipe, base_dir, problems)
        baseline = pick_baseline(grid, entries, problems)
    if problems or grid is None or recipe is None:
        raise RecipeError(problems, label)
    return CompareSetup(grid, recipe, entries, baseline, command)


def grid_problems(grid: GridSpec, command: str = "compare") -> list[str]:
    """What is wrong with a methods grid (seeds, shots, templates, strategies), before anything runs.

    A fewshot grid (grid.kind fewshot) also takes k = 0 and in-context strategies; a methods grid takes neither.
    """
    from mmpeft.evaluation.icl import STRATEGIES
    from mmpeft.evaluation.zero_shot import TEMPLATE_SETS

    problems = []
    if not grid.methods and not (grid.kind == "fewshot" and grid.strategies):
        problems.append("grid.methods: list at least one method (e.g. [full, lora]); in `mmpeft fewshot` on a "
                        "generative backbone, grid.strategies alone runs in-context prompting only")
    problems += seed_problems(grid)
    if grid.shots is not None and None not in grid.shots:  # None: a value build already reported
        least = 0 if grid.kind == "fewshot" else 1  # k = 0: in-context prompting without demonstrations
        if not grid.shots or any(k < least for k in grid.shots) or len(set(grid.shots)) != len(grid.shots):
            problems.append(f"grid.shots: {list(grid.shots)} must be distinct integers >= {least} (or leave it out)"
                            + ("; 0 is in-context prompting's zero-shot row" if least == 0 else ""))
    if grid.strategies is not None:
        if grid.kind != "fewshot":
            problems.append("grid.strategies: in-context prompting sweeps k, so it runs in `mmpeft fewshot`, not "
                            f"`mmpeft {command}`")
        if not grid.strategies:
            problems.append(f"grid.strategies: list at least one of {', '.join(STRATEGIES)} (or leave it out for all)")
        for i, strategy in enumerate(grid.strategies):
            if strategy not in STRATEGIES:
                problems.append(f"grid.strategies[{i}]: {strategy!r} is not a strategy"
                                f"{did_you_mean(strategy, STRATEGIES)}; valid: {', '.join(STRATEGIES)}")
    for i, entry in enumerate(grid.templates):
        if "{label}" not in entry and entry not in TEMPLATE_SETS:
            problems.append(f"grid.templates[{i}]: {show(entry)} is neither a template with {{label}} nor a built-in "
                            f"set{did_you_mean(entry, TEMPLATE_SETS)}; sets: {', '.join(TEMPLATE_SETS)}")
        elif entry not in TEMPLATE_SETS and (problem := template_problem(entry)):
            problems.append(f"grid.templates[{i}]: {show(entry)} {problem}")
    return problems




def resolve_methods(grid: GridSpec, recipe: Recipe | None, base_dir: Path, problems: list[str],
                    ) -> tuple[MethodEntry, ...]:
    """Each grid entry -> a validated method config, checked against the shared recipe (when it is valid)."""
    from mmpeft.methods import METHODS

    entries = []
    for i, entry in enumerate(grid.methods):
        where = f"grid.methods[{i}]"
        if not isinstance(entry, (str, dict)):
            continue  # build(GridSpec) said what it should be
        try:
            label, mapping, source = entry_mapping(entry, base_dir)
        except ValueError as error:
            problems.append(f"{where}: {error}")
            continue
        changes = mapping.pop("train", None) or {}
        if not isinstance(changes, dict):
            problems.append(f"{where}.train: expected a mapping of train keys (e.g. {{lr: 0.03}}), got {changes!r}")
            changes = {}
        if changes and recipe is not None:
            build(TrainSpec, {**to_plain(recipe.train), **changes}, f"{where}.train", problems)
        name = mapping.get("name")
        if name not in METHODS:
            problems.append(f"{where}: unknown method {show(name)}{did_you_mean(str(name), METHODS.names())}; "
                            f"valid: {', '.join(METHODS.names())}")
            continue
        problems += label_problems(where, label)
        config = build(METHODS.get(name).Config, mapping, where, problems)
        if config is None:
            continue
        if recipe is not None:
            problems += [f"{where} ({label}): {p}" for p in METHODS.get(name).check(recipe.replace(method=config))]
        entries.append(MethodEntry(label, config, source, changes))
    labels = [e.label for e in entries]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(f"grid.methods: label {label!r} appears {labels.count(label)} times; give entries distinct "
                        "`label:`s (e.g. {preset: lora-r8, r: 16, label: lora-r16})")
    return tuple(entries)


def entry_mapping(entry: str | dict, base_dir: Path) -> tuple[str, dict, str]:
    """(label, method mapping, where its settings came from) of one grid entry; ValueError says what is wrong."""
    from mmpeft.methods import METHODS

    if isinstance(entry, str):
        default = default_preset(entry)
        if default is not None:
            return entry, read_yaml(default), _shown(default)
        if entry in METHODS:
            return entry, {"name": entry}, f"defaults of {METHODS.get(entry).Config.__name__}"
        path = find_preset(entry, base_dir)
        return re.sub(r"\.ya?ml$", "", Path(entry).name), read_yaml(path), _shown(path)
    mapping = dict(entry)
    label = mapping.pop("label", None)
    if "preset" in mapping:
        ref = str(mapping.pop("preset"))
        path = default_preset(ref) or find_preset(ref, base_dir)
        merged = {**read_yaml(path), **mapping}
        changed = {k: v for k, v in mapping.items() if k != "train"}
        source = _shown(path) + (f" with {changed}" if changed else "")
        return str(label or re.sub(r"\.ya?ml$", "", Path(ref).name)), merged, source
    if "name" not in mapping:
        raise ValueError(f"a mapping entry needs `name` (a method) or `preset`, got keys {sorted(entry)}")
    return str(label or mapping["name"]), mapping, "inline"


def default_preset(name: str) -> Path | None:
    """The adapters/ preset a bare method name runs, if there is one."""
    if "/" in name or name.endswith((".yaml", ".yml")):  # a path: the user named the file
        return None
    path = PROJECT_ROOT / "adapters" / f"{DEFAULT_PRESETS.get(name, name.replace('_', '-'))}.yaml"
    return path if path.is_file() else None


def find_preset(ref: str, base_dir: Path) -> Path:
    from mmpeft.methods import METHODS

    for candidate in preset_candidates(ref, base_dir):
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in (PROJECT_ROOT / "adapters").glob("*.yaml"))
    raise ValueError(f"{ref!r} is neither a method ({', '.join(METHODS.names())}) nor a preset"
                     f"{did_you_mean(Path(ref).stem, presets + list(DEFAULT_PRESETS))}; presets in adapters/: "
                     f"{', '.join(presets)}")


def shared_data(setup: CompareSetup) -> DataSpec:
    """The recipe's data spec with the split seed pinned: the split every cell (and in-context row) shares."""
    data = setup.recipe.data
    return dataclasses.replace(data, split=dataclasses.replace(data.split, seed=setup.split_seed))


def train_changes(recipe: Recipe, entry: MethodEntry) -> dict[str, Any]:
    """An entry's `train:` keys as typed values (validated at load time, so building cannot fail here)."""
    if not entry.train_changes:
        return {}
    problems: list[str] = []
    merged = build(TrainSpec, {**to_plain(recipe.train), **entry.train_changes}, "train", problems)
    return {key: getattr(merged, key) for key in entry.train_changes}




def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)
