"""Loading a recipe: YAML (+ presets, + `key.sub=value` overrides) -> a validated, frozen Recipe (mmpeft.specs)."""

from __future__ import annotations

import copy
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from mmpeft.core.io import PROJECT_ROOT
from mmpeft.core.schema import RecipeError, build, did_you_mean, show
from mmpeft.specs import GENERATIVE_DATA_KEYS, DataSpec, Recipe
from mmpeft.train.tracking import experiment_problems, missing_tracker_problems


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | dict | None = None, *,
                data_files: bool = True) -> Recipe:
    """YAML file or mapping (+ `key.sub=value` overrides) -> validated Recipe; raises RecipeError.
    `data_files` False: a data path that no longer exists is no problem (a finished run's recipe, read to predict)."""
    if isinstance(source, Recipe) and not overrides:
        return source
    if isinstance(source, Recipe):
        source = source.to_dict()
    base_dir = Path.cwd()
    label = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise RecipeError([f"recipe file not found: {path}"])
        data = read_yaml(path)
        base_dir, label = path.resolve().parent, str(path)
        data.setdefault("name", path.stem)
    else:
        data = copy.deepcopy(source)
    data = resolve_presets(data, base_dir)
    for key, value in parse_overrides(overrides).items():
        set_override(data, key, value)
    data = resolve_presets(data, base_dir)  # an override may name a preset
    return validate(data, base_dir, label, data_files)


def validate(data: dict, base_dir: Path, label: str | None = None, data_files: bool = True) -> Recipe:
    from mmpeft.methods import METHODS

    problems: list[str] = []
    method_data = data.get("method")
    method = None
    if method_data is None:
        problems.append(f"method: required; valid methods: {', '.join(METHODS.names())}")
    elif not isinstance(method_data, dict) or "name" not in method_data:
        problems.append("method: expected a method name, a preset file or a mapping with `name`, got "
                        f"{show(method_data)}")
    elif method_data["name"] not in METHODS:
        name = method_data["name"]
        problems.append(f"method.name: unknown method {show(name)}{did_you_mean(str(name), METHODS.names())}; "
                        f"valid: {', '.join(METHODS.names())}")
    else:
        method = build(METHODS.get(method_data["name"]).Config, method_data, "method", problems)
    rest = {k: v for k, v in data.items() if k != "method"}
    recipe = build(Recipe, {**rest, "method": None}, "", problems)
    sections = (recipe.backbone, recipe.data, recipe.train, recipe.eval, recipe.output) if recipe else (None,)
    complete = None not in sections
    if complete:
        recipe = recipe.replace(method=method)
        problems += _check_files(recipe, base_dir, data_files)
        problems += _check_shifts(recipe)
        problems += _check_generative(recipe)
        problems += _check_conversations(recipe)
        problems += _check_stream(recipe)
        if method is not None:
            problems += METHODS.get(method.name).check(recipe)
    if problems:
        raise RecipeError(problems, label)
    return recipe


def _data_file_problems(data: DataSpec) -> list[str]:
    problems = []
    if data.source in ("folder", "csv", "jsonl", "hf_disk", "captions") and data.path and not Path(data.path).exists():
        problems.append(f"data.path: {data.source} source {data.path!r} does not exist")
    if data.source == "captions" and data.eval_path and not Path(data.eval_path).exists():
        problems.append(f"data.eval_path: captions table {data.eval_path!r} does not exist")
    if data.image_root and not Path(data.image_root).is_dir():
        problems.append(f"data.image_root: folder {data.image_root!r} does not exist")
    return problems


def _check_files(recipe: Recipe, base_dir: Path, data_files: bool = True) -> list[str]:
    problems = []
    problems += missing_tracker_problems(recipe.train) + experiment_problems(recipe.train, recipe.name)
    if data_files:
        problems += _data_file_problems(recipe.data)
    output_dir = Path(recipe.output.dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        problems.append(f"output.dir: {recipe.output.dir!r} is a file, not a folder; run folders are created in it")
    backbone_id = recipe.backbone.id
    looks_local = backbone_id.startswith((".", "/", "~")) or Path(backbone_id).exists()
    if looks_local and not Path(backbone_id).expanduser().is_dir():
        problems.append(f"backbone.id: local directory {backbone_id!r} does not exist")
    return problems


def _check_generative(recipe: Recipe) -> list[str]:
    """Settings of the other family: generative-only ones on a backbone declared a dual encoder, retrieval selection
    on one declared generative (family auto is checked when it loads)."""
    if recipe.backbone.family == "generative" and recipe.train.select_metric == "retrieval":
        return ["train.select_metric: 'retrieval' ranks images against texts with a dual encoder, but "
                "backbone.family is 'generative'; use accuracy, macro_f1 or loss"]
    if recipe.backbone.family != "dual_encoder":
        return _budget_problems(recipe)
    problems = [f"data.{key}: the image budget and max_length apply to generative backbones, but backbone.family is "
                "'dual_encoder' (it resizes every image to its fixed input size)"
                for key in GENERATIVE_DATA_KEYS if getattr(recipe.data, key) is not None]
    if recipe.train.objective == "generative":
        problems.append("train.objective: 'generative' trains answers of image-text-to-text models, but "
                        "backbone.family is 'dual_encoder'; use classification or contrastive")
    if recipe.eval.generate:
        problems.append("eval.generate: free-form answers need backbone.family: generative (or auto)")
    return problems


def _budget_problems(recipe: Recipe) -> list[str]:
    """An image budget the backbone's processor cannot take (pixel bounds on a fixed-size one), found by `check`."""
    data = recipe.data
    if data.max_pixels is None and data.min_pixels is None:
        return []
    from mmpeft.backbones.generative import GenerativeBackbone

    return GenerativeBackbone.recipe_budget_problems(recipe.backbone, data)


def _check_conversations(recipe: Recipe) -> list[str]:
    """Conversation sources (llava, sharegpt, messages, llamafactory): their file, and keys that cannot apply."""
    from mmpeft.data.conversation_data import CONVERSATION_SOURCES, conversation_spec_problems

    data = recipe.data
    problems = conversation_spec_problems(data)
    if data.source not in CONVERSATION_SOURCES:
        if data.max_length is not None:
            problems.append(f"data.max_length: cuts conversations (data.source: {', '.join(CONVERSATION_SOURCES)}); "
                            f"data.source: {data.source} asks one question per image and answers with a label")
        if recipe.train.select_metric == "loss":  # only conversations have a val loss to rank epochs by
            problems.append(f"train.select_metric: 'loss' is the val assistant-token loss of conversation data "
                            f"(data.source: {', '.join(CONVERSATION_SOURCES)}); data.source: {data.source} selects "
                            "by accuracy or macro_f1 (retrieval for caption data)")
        return problems
    if data.path and not Path(data.path).exists():
        problems.append(f"data.path: {data.source} file {data.path!r} does not exist")
    if recipe.train.objective != "generative":
        problems.append(f"train.objective: conversations train with 'generative' (assistant-token loss), not "
                        f"{recipe.train.objective!r}")
    if recipe.backbone.family == "dual_encoder":
        problems.append(f"backbone.family: data.source: {data.source} needs a generative backbone, not dual_encoder")
    return problems


def _check_stream(recipe: Recipe) -> list[str]:
    """`data.stream`: what a stream cannot do, refused before any model loads (docs/captions-and-shards.md)."""
    data = recipe.data
    if not data.stream:
        return []
    problems = []
    if data.shots is not None:
        problems.append("data.shots: a stream cannot be sampled k per class (it is read in order, never indexed); "
                        "index the shards (data.stream: false) for k-shot training")
    if data.eval_path is None:
        problems.append("data.eval_path: a streamed training split needs held-out shards for the test split (a "
                        "random test share of a stream is not possible); set data.eval_path: <shard pattern>")
    if data.split.val > 0 and data.val_path is None:
        problems.append(f"data.split.val: {data.split.val} cannot be a random share of a stream; set data.val_path: "
                        "<held-out shard pattern> for validation, or data.split.val: 0 for none")
    if recipe.train.objective not in ("contrastive", "classification"):
        problems.append(f"train.objective: a streamed split trains with 'classification' (labelled shards) or "
                        f"'contrastive' (caption shards), not {recipe.train.objective!r}")
    workers = recipe.train.num_workers
    if workers != "auto" and workers > 1:
        problems.append(f"train.num_workers: {workers} with data.stream: at most 1 reading worker (more would split "
                        "the shards between workers and the sample order would depend on their count)")
    processes = max(int(os.environ.get(name, "1") or 1) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    if processes > 1:
        problems.append(f"data.stream: {processes} processes; a stream is read by one process (shards are not split "
                        "between processes yet): run it in one process, or set data.stream: false")
    return problems


def _check_shifts(recipe: Recipe) -> list[str]:
    """Unknown shift names, found before any data is read (the names live in mmpeft.data.shifts)."""
    from mmpeft.data.shifts import parse_shift

    problems = []
    for key in ("shift", "eval_shifts"):
        for i, text in enumerate(getattr(recipe.data, key)):
            try:
                parse_shift(text)
            except ValueError as error:
                problems.append(f"data.{key}[{i}]: {error}")
    return problems


def resolve_presets(data: dict, base_dir: Path) -> dict:
    """`method: adapters/lora-r8.yaml` (or `lora-r8`, or a bare method name) -> a method mapping."""
    method = data.get("method")
    if isinstance(method, str):
        data["method"] = _load_method_preset(method, base_dir)
    elif isinstance(method, dict) and "preset" in method:
        merged = _load_method_preset(method["preset"], base_dir)
        merged.update({k: v for k, v in method.items() if k != "preset"})
        data["method"] = merged
    return data


def _load_method_preset(ref: str, base_dir: Path) -> dict:
    from mmpeft.methods import METHODS

    if ref in METHODS:
        return {"name": ref}
    for candidate in preset_candidates(ref, base_dir):
        if candidate.is_file():
            preset = read_yaml(candidate)
            if "name" not in preset:
                raise RecipeError([f"method: preset {candidate} has no `name` key"])
            return preset
    presets = [p.stem for p in (PROJECT_ROOT / "adapters").glob("*.yaml")]
    raise RecipeError([f"method: {ref!r} is neither a method ({', '.join(METHODS.names())}) nor a preset file"
                       f"{did_you_mean(Path(ref).stem, presets)}; presets in adapters/: {', '.join(sorted(presets))}"])


def preset_candidates(ref: str, base_dir: Path) -> list[Path]:
    names = [ref] if ref.endswith((".yaml", ".yml")) else [ref, f"{ref}.yaml"]
    roots = [Path.cwd(), base_dir, PROJECT_ROOT, PROJECT_ROOT / "adapters"]
    return [root / name for name in names for root in roots]


def parse_overrides(overrides: list[str] | dict | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError([f"override {item!r}: expected key.sub=value (for example train.epochs=3)"])
        try:
            parsed[key.strip()] = parse_yaml(value) if value.strip() else None
        except yaml.YAMLError as error:
            raise RecipeError([f"override {show(item)}: the value is not valid YAML ({show_error(error)}); quote "
                               "a string value, e.g. 'data.templates=[\"a photo of a {label}.\"]'"]) from None
    return parsed


def set_override(data: dict, dotted: str, value: Any,
                 expand_name: typing.Callable[[list[str], str], Any] | None = None) -> None:
    """`train.epochs=3`; a number indexes into a list (`grid.methods.1.r=16`, `tasks.1.shift=[rot90]`); a section
    written as a name (`method: lora-r8`) is first made its mapping by `expand_name(path, name)` (presets by
    default)."""
    expand_name = expand_name or _expand_method
    keys = dotted.split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        where = ".".join(keys[:depth])
        index: Any = key
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError([f"override {dotted}: {key!r} is not an index of {where} (it has {len(node)} "
                                   f"items: 0 to {len(node) - 1})"])
            index = int(key)
        elif not isinstance(node, dict):
            raise RecipeError([f"override {dotted}: {where} is not a section (it is {show(node)})"])
        if depth == len(keys) - 1:
            node[index] = value
            return
        child = node[index] if isinstance(node, list) else node.get(index)
        if isinstance(child, str):
            child = expand_name(keys[:depth + 1], child)
        node[index] = {} if child is None else child
        node = node[index]


def _expand_method(path: list[str], name: str) -> Any:
    """`method: lora-r8` and a grid's `methods: [lora, ...]` entries are presets or method names."""
    is_method = path[-1] == "method" or (len(path) > 1 and path[-2] == "methods" and path[-1].isdigit())
    return resolve_presets({"method": name}, Path.cwd())["method"] if is_method else name


MAX_ALIAS_NODES = 10_000  # values an alias may repeat, in all: a recipe repeats a few; an alias bomb, billions


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would keep the last one silently) and alias expansion past
    MAX_ALIAS_NODES (nine nested anchors of nine expand 600 bytes into 387 million values)."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self.alias_nodes = 0
        self.node_sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self.anchors:
                self.alias_nodes += self.expanded_size(self.anchors[event.anchor])
                if self.alias_nodes > MAX_ALIAS_NODES:
                    raise yaml.composer.ComposerError(
                        None, None, f"aliases expand to more than {MAX_ALIAS_NODES} values (an alias bomb?); "
                        "write the values out or use fewer nested aliases", event.start_mark)
        return super().compose_node(parent, index)

    def expanded_size(self, node: yaml.Node) -> int:
        """Values `node` stands for once every alias inside it is expanded (memoised: shared nodes count once)."""
        key = id(node)
        if key not in self.node_sizes:
            self.node_sizes[key] = MAX_ALIAS_NODES + 1  # a node inside itself (recursive alias) is a bomb too
            children = node.value if isinstance(node, yaml.SequenceNode) else (
                [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else [])
            self.node_sizes[key] = min(1 + sum(self.expanded_size(child) for child in children),
                                       10 * MAX_ALIAS_NODES)
        return self.node_sizes[key]

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} characters is too long to read; write a shorter "
                "number (or quote it, if it is text)", node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line}; first given on line {seen[key]}): YAML would "
                    "silently keep the last one; remove one of them", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)


def parse_yaml(text: str) -> Any:
    """YAML text -> data through RecipeLoader; raises yaml.YAMLError."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> dict:
    """A YAML file whose top level is a mapping; anything else is a RecipeError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError([f"{path}: not a YAML text file (byte {error.start} is not UTF-8 text); a recipe is "
                           "a UTF-8 YAML file"]) from None
    except OSError as error:
        raise RecipeError([f"{path}: cannot be read: {error.strerror or error}"]) from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as error:
        raise RecipeError([f"{path}: not valid YAML: {show_error(error)}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: the top level must be a mapping, got {type(data).__name__}"])
    return data


def show_error(error: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (line and column), without the echoed source."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"
