"""The `search:` section of a `mmpeft search` recipe: the space (methods and ranges of their settings), the budget
and the successive-halving schedule, validated all at once before any model loads.

A search recipe is an ordinary compare recipe (backbone, data, train, eval, output, `grid: {seeds, executor}`)
without `grid.methods`: the search picks them. Each `search.methods` entry is a method (a name, `{name: ...}` or
`{preset: ...}`, as in grid.methods) whose keys, and whose `train:` keys, are fixed values, `{choices: [...]}` or
`{low:, high:, log:, step:}` ranges. Validation builds every method at each end of its ranges and at each choice,
and loads the rest as the methods grid it becomes (mmpeft.grids.method_setup), so a problem is reported with its
`search.` path before the first trial runs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from mmpeft.core.schema import Range, RecipeError, build, did_you_mean, show, to_plain
from mmpeft.grids.base import differences, label_problems
from mmpeft.grids.loading import load_setup, read_with_section
from mmpeft.grids.method_setup import CompareSetup, entry_mapping
from mmpeft.specs import Positive, Seed, TrainSpec

SPACE_KEYS = ("choices", "low", "high", "log", "step")
METRICS = ("val_accuracy", "val_macro_f1")  # what each epoch's validation reports (mmpeft.train.Trainer)
CONVERSATIONS = ("llava", "sharegpt", "messages", "llamafactory")
MISSING_OPTUNA = "search: needs Optuna, which is not installed: pip install 'mmpeft[search]'"


@dataclass(frozen=True)
class BudgetSpec:
    epochs: Positive | None = None  # training epochs summed over all trials (pruned ones count what they ran)
    gpu_hours: Annotated[float, Range(gt=0)] | None = None  # wall-clock hours of the trials (on whatever device)

    def __post_init__(self) -> None:
        if self.epochs is None and self.gpu_hours is None:
            raise ValueError("give epochs (total training epochs over all trials) and/or gpu_hours (wall-clock "
                             "hours of the trials), e.g. budget: {epochs: 40}")


@dataclass(frozen=True)
class SearchSpec:
    methods: tuple[str | dict[str, Any], ...]  # the space: one entry per method (see the module docstring)
    budget: BudgetSpec  # no trial starts once it is spent; a running trial stops at it
    trials: Positive = 20  # most trials to start
    min_epochs: Positive = 1  # the first rung; rungs at min_epochs * reduction_factor^i, up to train.epochs
    reduction_factor: Annotated[int, Range(ge=2)] = 3  # 1 in reduction_factor trials goes on past each rung
    metric: str = "val_accuracy"  # maximised; validation only
    top: Positive = 2  # best completed configurations re-run over grid.seeds and evaluated once on test
    sampler_seed: Seed | None = None  # Optuna's TPE sampler; default: the recipe's seed


@dataclass(frozen=True)
class Param:
    """One searched setting: `key` is a method key (`r`) or a train key (`train.lr`); `name` is Optuna's."""

    name: str
    key: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def candidates(self) -> list:  # what validation builds: a range's ends and, with a step, the next value
        if self.choices is not None:
            return list(self.choices)
        return [self.low, self.high] + ([min(self.low + self.step, self.high)] if self.step else [])

    def integer(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1))

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer():
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def spelt(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, **({"step": self.step} if self.step else {})}


@dataclass(frozen=True)
class SearchEntry:
    label: str  # the method's label: trial folders and grid rows are named after it
    fixed: dict  # the method mapping (name and every fixed key, presets read) without the searched keys
    train_fixed: dict  # fixed `train:` changes of this method
    params: tuple[Param, ...]  # searched method keys, then searched train keys

    def spelt(self) -> dict:
        train = {**self.train_fixed, **{p.key[6:]: p.spelt() for p in self.params if p.key.startswith("train.")}}
        method = {p.key: p.spelt() for p in self.params if not p.key.startswith("train.")}
        return {"label": self.label, **self.fixed, **method, **({"train": train} if train else {})}

    def first(self) -> dict:
        """A grid.methods entry at the first candidate of every searched key: what the methods grid validates."""
        values = {p.key: p.candidates()[0] for p in self.params}
        return self.entry(self.label, values)

    def entry(self, label: str, values: dict[str, Any]) -> dict:
        """A grid.methods entry with the searched keys at `values` (keyed like Param.key)."""
        train = {**self.train_fixed, **{k[6:]: v for k, v in values.items() if k.startswith("train.")}}
        method = {k: v for k, v in values.items() if not k.startswith("train.")}
        return {"label": label, **self.fixed, **method, **({"train": train} if train else {})}


@dataclass(frozen=True)
class SearchSetup:
    spec: SearchSpec
    entries: tuple[SearchEntry, ...]
    compare: CompareSetup  # the shared recipe and grid (seeds, executor); its methods are each entry's first()
    seed: int  # the sampler's seed

    def resolved(self) -> dict:
        """The recipe as `--resume` reloads it: every default filled in, the space spelt out."""
        data = self.compare.recipe.to_dict()
        data.pop("method")
        grid = {k: v for k, v in to_plain(self.compare.grid).items() if k != "methods"}
        search = {**to_plain(self.spec), "methods": [e.spelt() for e in self.entries], "sampler_seed": self.seed}
        return {**data, "grid": grid, "search": search}

    def settings(self, changeable: tuple[str, ...]) -> dict:
        """What the trials depend on (a resumed search keeps it): the shared recipe, the search section but for
        the `changeable` keys."""
        recipe = {k: v for k, v in self.compare.recipe.to_dict().items() if k not in ("output", "method")}
        search = {k: v for k, v in self.resolved()["search"].items() if k not in changeable}
        return json.loads(json.dumps({"recipe": recipe, "search": search}))

    def refuse_changes(self, saved: dict, folder: Path, changeable: tuple[str, ...]) -> None:
        """RecipeError when the settings saved with the trials differ from these (but for `changeable`)."""
        changed = differences(saved, self.settings(changeable))
        if changed:
            raise RecipeError([f"search {folder}: its trials were run with other settings ({'; '.join(changed[:4])})",
                               f"a resumed search may change only search.{', search.'.join(changeable)} and grid; "
                               "use another output.name for a new search"])


def val_score(metrics: dict, metric: str) -> float:
    """A trial epoch's score for the scheduler; a run without a labelled validation split has none to give."""
    if metric not in metrics:
        raise ValueError(f"search.metric: {metric} was not reported: this trial has no labelled validation split")
    return metrics[metric]


def trial_recipe(setup: SearchSetup, entry: SearchEntry, values: dict, folder: Path, name: str):
    """The shared recipe with the trial's method and train changes, the grid's split, validation only."""
    from mmpeft.grids.method_setup import MethodEntry, shared_data, train_changes
    from mmpeft.methods import METHODS
    from mmpeft.specs import OutputSpec

    mapping = entry.entry(entry.label, values)
    changes = mapping.pop("train", {})
    mapping.pop("label")
    problems: list[str] = []
    config = build(METHODS.get(mapping["name"]).Config, mapping, f"trial {name}", problems)
    if problems:
        raise RecipeError(problems)
    recipe = setup.compare.recipe
    typed = train_changes(recipe, MethodEntry(entry.label, config, "search", changes))
    return recipe.replace(method=config, data=shared_data(setup.compare),
                          train=dataclasses.replace(recipe.train, **typed),
                          eval=dataclasses.replace(recipe.eval, zero_shot=False, test=False),
                          output=OutputSpec(dir=str(folder), name=name))


def optuna_installed() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


def is_space(value: Any) -> bool:
    return isinstance(value, dict) and any(k in value for k in SPACE_KEYS)


def parse_param(where: str, name: str, key: str, value: dict, problems: list[str]) -> Param | None:
    """A `{choices: [...]}` or `{low:, high:, log:, step:}` mapping -> Param (None with problems)."""
    unknown = [k for k in value if k not in SPACE_KEYS]
    for k in unknown:
        problems.append(f"{where}: unknown key {show(k)}{did_you_mean(str(k), SPACE_KEYS)}; a searched value is "
                        "{choices: [...]} or {low: ..., high: ...[, log: true][, step: ...]}")
    found = len(problems)  # the other checks still run after unknown keys: every problem at once
    if "choices" in value:
        choices = value["choices"]
        if any(k in value for k in ("low", "high", "log", "step")):
            problems.append(f"{where}: give either choices or a low/high range, not both")
        if not isinstance(choices, list) or not choices:
            problems.append(f"{where}.choices: expected a non-empty list of values, got {show(choices)}")
        elif not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            problems.append(f"{where}.choices: values must be numbers, strings, booleans or null, got {show(choices)}")
        elif len({repr(c) for c in choices}) != len(choices):
            problems.append(f"{where}.choices: {show(choices)} repeats a value")
        return None if unknown or len(problems) > found else Param(name, key, choices=tuple(choices))
    low, high, log, step = value.get("low"), value.get("high"), value.get("log", False), value.get("step")
    numbers = [("low", low), ("high", high)] + ([("step", step)] if step is not None else [])
    for k, v in numbers:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            problems.append(f"{where}.{k}: expected a number, got {show(v)}")
    if not isinstance(log, bool):
        problems.append(f"{where}.log: expected true or false, got {show(log)}")
    if len(problems) > found:
        return None
    if low >= high:
        problems.append(f"{where}: low {low} must be below high {high}")
    if log and low <= 0:
        problems.append(f"{where}: log: true needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        problems.append(f"{where}.step: {step} must be > 0, and cannot be combined with log: true")
    return None if unknown or len(problems) > found else Param(name, key, low=low, high=high, log=log, step=step)


def parse_entry(i: int, entry: Any, base_dir: Path, problems: list[str]) -> SearchEntry | None:
    """One search.methods entry: its method (name or preset), fixed keys and searched keys."""
    from mmpeft.methods import METHODS

    where = f"search.methods[{i}]"
    mapping = copy.deepcopy(entry) if isinstance(entry, dict) else entry
    train = mapping.pop("train", None) or {} if isinstance(mapping, dict) else {}
    if not isinstance(train, dict):
        problems.append(f"{where}.train: expected a mapping of train keys (e.g. {{lr: {{low: 0.001, high: 0.1}}}}), "
                        f"got {show(train)}")
        train = {}
    space = {k: mapping.pop(k) for k in list(mapping) if is_space(mapping[k])} if isinstance(mapping, dict) else {}
    try:
        label, fixed, _ = entry_mapping(mapping, base_dir)
    except (ValueError, TypeError) as error:
        problems.append(f"{where}: {error}")
        return None
    name = fixed.get("name")
    if name not in METHODS:
        problems.append(f"{where}: unknown method {show(name)}{did_you_mean(str(name), METHODS.names())}; "
                        f"valid: {', '.join(METHODS.names())}")
        return None
    problems += label_problems(where, label)
    config_keys = [f.name for f in dataclasses.fields(METHODS.get(name).Config) if f.name != "name"]
    train_keys = [f.name for f in dataclasses.fields(TrainSpec)]
    params = []
    for group, keys, values, prefix in (("", config_keys, space, ""),
                                         (".train", train_keys, {k: v for k, v in train.items() if is_space(v)},
                                          "train.")):
        for key, value in values.items():
            if key not in keys:
                owner = "train" if prefix else f"method {name!r}"
                problems.append(f"{where}{group}.{key}: {owner} has no key {key!r}{did_you_mean(str(key), keys)}; "
                                f"keys: {', '.join(keys)}")
                continue
            param = parse_param(f"{where}{group}.{key}", f"{label}.{prefix}{key}", prefix + key, value, problems)
            params += [param] if param is not None else []
    result = SearchEntry(label, fixed, {k: v for k, v in train.items() if not is_space(v)}, tuple(params))
    check_candidates(where, result, METHODS.get(name).Config, problems)
    return result


def check_candidates(where: str, entry: SearchEntry, config_class: type, problems: list[str]) -> None:
    """Build the method's config at every candidate of every searched method key (the others at their first)."""
    firsts = {p.key: p.candidates()[0] for p in entry.params if not p.key.startswith("train.")}
    for param in [p for p in entry.params if not p.key.startswith("train.")]:
        for candidate in param.candidates():
            build(config_class, {**entry.fixed, **firsts, param.key: candidate}, where, problems)


def check_train_candidates(where: str, entry: SearchEntry, shared: TrainSpec, problems: list[str]) -> None:
    """The shared train section with this method's changes at every candidate of every searched train key."""
    base = {**to_plain(shared), **entry.train_fixed}
    firsts = {p.key[6:]: p.candidates()[0] for p in entry.params if p.key.startswith("train.")}
    for param in [p for p in entry.params if p.key.startswith("train.")]:
        for candidate in param.candidates():
            build(TrainSpec, {**base, **firsts, param.key[6:]: candidate}, f"{where}.train", problems)


def load_search_setup(source: str | Path | dict, overrides: list[str] | dict | None = None) -> SearchSetup:
    """A search recipe -> SearchSetup; every problem of the search section and of the rest in one RecipeError."""
    data, search_data, rest, base_dir, label = read_with_section(source, overrides, "search")
    if search_data is None:
        raise RecipeError(["search: required in a search recipe, e.g. search: {methods: [lora, bitfit], budget: "
                           "{epochs: 40}}"], label)
    problems: list[str] = []
    spec = build(SearchSpec, search_data, "search", problems)
    entries, indices = parse_entries(spec, base_dir, problems)
    grid = section_problems(data, problems)
    compare = None
    try:
        methods = [e.first() for e in entries] or ["zero_shot"]  # a placeholder keeps the rest checked
        compare = load_setup({**data, "grid": {**grid, "methods": methods}}, rest, "compare")
    except RecipeError as error:
        problems += [_renamed(p, indices) for p in error.problems]
    if compare is not None and spec is not None:
        problems += setting_problems(spec, compare, entries, indices)
    executor = compare.grid.executor if compare is not None else grid.get("executor")
    if executor != "ray" and not optuna_installed():  # Ray Tune schedules a ray search itself
        problems.insert(0, MISSING_OPTUNA)
    if problems or compare is None or spec is None:
        raise RecipeError(list(dict.fromkeys(problems)), label)
    seed = spec.sampler_seed if spec.sampler_seed is not None else compare.recipe.seed
    return SearchSetup(spec, tuple(entries), compare, seed)


def parse_entries(spec: SearchSpec | None, base_dir: Path, problems: list[str]) -> tuple[list[SearchEntry], list[int]]:
    if spec is None:
        return [], []
    if spec.metric not in METRICS:
        problems.append(f"search.metric: {spec.metric!r} is not a validation metric{did_you_mean(spec.metric, METRICS)}"
                        f"; a search selects on validation only: {', '.join(METRICS)}")
    if not spec.methods:
        problems.append("search.methods: list at least one method, e.g. [{name: lora, r: {choices: [4, 8]}}]")
    entries, indices = [], []
    for i, entry in enumerate(spec.methods or ()):
        parsed = parse_entry(i, entry, base_dir, problems) if isinstance(entry, (str, dict)) else None  # build said
        if parsed is not None:
            entries.append(parsed)
            indices.append(i)
    labels = [e.label for e in entries]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(f"search.methods: label {label!r} appears {labels.count(label)} times; give entries distinct "
                        "`label:`s (e.g. {name: lora, label: lora-text, towers: [text]})")
    return entries, indices


def section_problems(data: dict, problems: list[str]) -> dict:
    """The recipe's own `method` and `grid.methods` belong to the search; the grid section without them."""
    if "method" in data:
        data.pop("method")
        problems.append("method: a search recipe takes its methods from search.methods; remove the top-level `method`")
    grid = data.pop("grid", None)
    if grid is None:
        return {}
    if not isinstance(grid, dict):
        problems.append(f"grid: expected a mapping (e.g. {{seeds: [0, 1, 2]}}), got {show(grid)}")
        return {}
    grid = dict(grid)
    if grid.pop("methods", None) is not None:
        problems.append("grid.methods: a search picks the methods it re-runs (search.top best trials); list the "
                        "candidates in search.methods instead")
    if grid.get("kind", "methods") != "methods":
        problems.append(f"grid.kind: a search re-runs its best configurations as a methods grid, not {grid['kind']!r}")
        grid.pop("kind")
    return grid


def setting_problems(spec: SearchSpec, compare: CompareSetup, entries: list[SearchEntry], indices: list[int]
                     ) -> list[str]:
    """What the search needs of the shared recipe: a validation split, rungs that fit, train ranges that build."""
    recipe, problems = compare.recipe, []
    for i, entry in zip(indices, entries):
        check_train_candidates(f"search.methods[{i}]", entry, recipe.train, problems)
    if spec.min_epochs > recipe.train.epochs:
        problems.append(f"search.min_epochs: {spec.min_epochs} is more than train.epochs {recipe.train.epochs}: the "
                        "first rung must fit in a trial")
    if spec.budget is not None and spec.budget.epochs is not None and spec.budget.epochs < spec.min_epochs:
        problems.append(f"search.budget.epochs: {spec.budget.epochs} is less than search.min_epochs "
                        f"{spec.min_epochs}: not one trial could reach the first rung")
    if spec.top > spec.trials:
        problems.append(f"search.top: {spec.top} is more than search.trials {spec.trials}")
    if recipe.data.split.val == 0:
        problems.append("data.split.val: 0 leaves no validation split, and a search selects on validation only; "
                        "set e.g. data.split: {val: 0.2}")
    if recipe.data.source in CONVERSATIONS:
        problems.append(f"data.source: {recipe.data.source} conversations have no label scores to select on; a "
                        "search needs classification data")
    if compare.grid.shots is not None:
        problems.append("grid.shots: a search runs at data.shots; remove grid.shots (or search once per k)")
    return problems


def _renamed(problem: str, indices: list[int]) -> str:
    """`grid.methods[j]` (the methods grid the search validates through) -> `search.methods[i]`."""
    return re.sub(r"grid\.methods\[(\d+)\]", lambda m: f"search.methods[{indices[int(m.group(1))]}]"
                  if int(m.group(1)) < len(indices) else m.group(0), problem)


def extreme_recipes(setup: SearchSetup) -> list[tuple[str, list[Any]]]:
    """(label, recipes) per searched method: a trial recipe at every combination of each searched key's lowest and
    highest candidate (a larger `r` takes more memory, a larger `reduction_factor` less): among them is the most
    memory one of its trials can take, what `mmpeft plan` sizes for a search recipe."""
    import itertools

    found = []
    for entry in setup.entries:
        extremes = [list(dict.fromkeys(_extremes(p))) for p in entry.params]
        recipes = [trial_recipe(setup, entry, dict(zip([p.key for p in entry.params], combination)),
                                Path(setup.compare.recipe.output.dir), entry.label)
                   for combination in itertools.product(*extremes)]
        found.append((entry.label, recipes))
    return found


def _extremes(param: Param) -> list:
    candidates = param.candidates()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in candidates):
        return [min(candidates), max(candidates)]
    return candidates  # names (e.g. towers): each of them
