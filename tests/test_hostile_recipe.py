"""Hostile recipes (issue 20): every out-of-range number, an alias bomb, duplicate keys, binary files, bad overrides
and escaping run names are refused before any model loads, with the YAML path, and `mmpeft check` exits 2."""

from __future__ import annotations

import re
import time

import pytest

from mmpeft.cli import main
from mmpeft.core.schema import RecipeError
from mmpeft.runs.recipe import load_recipe

BASE = {"method": {"name": "lora"}}

# override -> what the error must say (each alone on an otherwise valid recipe)
OUT_OF_RANGE = {
    "train.epochs=0": "train.epochs: 0 is out of range; it must be >= 1",
    "train.epochs=-3": "train.epochs: -3 is out of range",
    "train.batch_size=-1": "train.batch_size: -1 is out of range; it must be >= 1",
    "train.batch_size=0": "train.batch_size: 0 is out of range",
    "train.max_grad_norm=-1": "train.max_grad_norm: -1 is out of range; it must be > 0",
    "train.warmup_ratio=1.5": "train.warmup_ratio: 1.5 is out of range; it must be >= 0 and <= 1",
    "train.warmup_ratio=-0.1": "train.warmup_ratio: -0.1 is out of range",
    "train.early_stopping_patience=0": "train.early_stopping_patience: 0 is out of range; it must be >= 1",
    "train.checkpoint_every_steps=-1": "train.checkpoint_every_steps: -1 is out of range",
    "train.grad_accum_steps=0": "train.grad_accum_steps: 0 is out of range; it must be >= 1",
    "train.lr=0": "train.lr: 0 is out of range; it must be > 0",
    "train.lr=.nan": "train.lr: expected a finite number, got nan",
    "train.weight_decay=-0.01": "train.weight_decay: -0.01 is out of range; it must be >= 0",
    "train.num_workers=-1": "train.num_workers: -1 is out of range; it must be >= 0",
    "eval.batch_size=0": "eval.batch_size: 0 is out of range; it must be >= 1",
    "eval.max_new_tokens=0": "eval.max_new_tokens: 0 is out of range; it must be >= 1",
    "seed=-1": "seed: -1 is out of range; it must be >= 0 and < 4294967296",
    "data.shots=0": "data.shots: 0 is out of range; it must be >= 1",
    "data.split.val=-0.1": "data.split.val: -0.1 is out of range; it must be >= 0 and < 1",
    "data.split.test=0": "data.split.test: 0 is out of range; it must be > 0 and < 1",
    "data.split.seed=-2": "data.split.seed: -2 is out of range",
    "data.augment.crop_scale=[0.5,1.5]": "data.augment.crop_scale[1]: 1.5 is out of range; it must be > 0 and <= 1",
    "data.augment.color_jitter=2": "data.augment.color_jitter: 2 is out of range; it must be >= 0 and <= 1",
    "data.augment.affine_degrees=-5": "data.augment.affine_degrees: -5 is out of range",
    "data.augment.affine_translate=1.5": "data.augment.affine_translate: 1.5 is out of range",
    "method.r=0": "method.r: 0 is out of range; it must be >= 1",
    "method.alpha=0": "method.alpha: 0 is out of range; it must be > 0",
    "method.dropout=1": "method.dropout: 1 is out of range; it must be >= 0 and < 1",
}


@pytest.mark.parametrize("override", list(OUT_OF_RANGE))
def test_out_of_range_numbers_are_recipe_errors_with_their_path(override):
    with pytest.raises(RecipeError) as caught:
        load_recipe(BASE, [override])
    assert OUT_OF_RANGE[override] in str(caught.value)
    assert len(caught.value.problems) == 1  # the cross-field checks do not repeat it in other words


@pytest.mark.parametrize(("method", "override", "expected"), [
    ("bottleneck", "method.reduction_factor=0", "method.reduction_factor: 0 is out of range"),
    ("coop", "method.n_ctx=0", "method.n_ctx: 0 is out of range"),
    ("vpt", "method.n_tokens=-1", "method.n_tokens: -1 is out of range"),
])
def test_method_config_ranges(method, override, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe({"method": {"name": method}}, [override])


def test_every_numeric_field_of_every_section_has_a_range():
    import dataclasses
    from typing import get_type_hints

    from mmpeft.core.schema import _range_of
    from mmpeft.methods import METHODS
    from mmpeft.sequences.regularisers import REGULARISERS
    from mmpeft.specs import AugmentSpec, BackboneSpec, DataSpec, EvalSpec, OutputSpec, Recipe, SplitSpec, TrainSpec

    classes = [Recipe, BackboneSpec, DataSpec, SplitSpec, AugmentSpec, TrainSpec, EvalSpec, OutputSpec,
               *(METHODS.get(name).Config for name in METHODS.names()),
               *(REGULARISERS.get(name).Config for name in REGULARISERS.names())]
    unbounded = []
    for cls in classes:
        plain, extras = get_type_hints(cls), get_type_hints(cls, include_extras=True)
        for field in dataclasses.fields(cls):
            numeric = any(t in str(plain[field.name]) for t in ("int", "float"))
            if numeric and "Literal" not in str(plain[field.name]) and _range_of(extras[field.name]) is None:
                unbounded.append(f"{cls.__name__}.{field.name}")
    assert unbounded == []


def test_all_range_problems_are_reported_at_once():
    with pytest.raises(RecipeError) as caught:
        load_recipe(BASE, ["train.epochs=0", "train.batch_size=0", "eval.batch_size=0"])
    assert len(caught.value.problems) == 3


def alias_bomb() -> str:
    """Nine nested anchors of nine: 9**9 (387 million) strings once expanded, from about 600 bytes."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 9):
        previous, name = chr(96 + level), chr(97 + level)
        lines.append(f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]")
    return "\n".join(lines) + "\n"


FILES = {  # file text (or bytes) -> what the error must say
    "bomb": (alias_bomb(), "aliases expand to more than"),
    "duplicate_top": ("method: lora\nseed: 1\nseed: 2\n", "duplicate key 'seed' (line 3; first given on line 2)"),
    "duplicate_nested": ("method: lora\ntrain:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n",
                         "duplicate key 'epochs' (line 5; first given on line 3)"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a YAML text file (byte 0 is not UTF-8 text)"),
    "not_yaml": ("method: [lora\n", "not valid YAML"),
    "huge_integer": ("method: lora\nseed: " + "9" * 5000 + "\n",
                     "an integer of 5000 characters is too long to read; write a shorter number (or quote it, if it "
                     "is text) at line 2, column 7"),
}


@pytest.mark.parametrize("case", list(FILES))
def test_hostile_yaml_files_are_refused_naming_the_file(case, tmp_path, capsys):
    content, expected = FILES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    started = time.perf_counter()
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert expected in str(caught.value) and str(path) in str(caught.value)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err) < 1000
    assert time.perf_counter() - started < 10


def test_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("defaults: &t {epochs: 2, lr: 0.1}\nmethod: lora\ntrain:\n  <<: *t\n  epochs: 3\n")
    with pytest.raises(RecipeError, match="defaults: unknown key"):  # merged fine; the anchor's own key is unknown
        load_recipe(path)


HUGE = "x" * 100_000
HUGE_VALUES = {  # a recipe with one huge value -> the start of the (short) error
    "wrong_type": ({**BASE, "train": {"epochs": HUGE}}, "train.epochs: expected an integer"),
    "template_without_label": ({**BASE, "data": {"templates": [HUGE]}}, "data.templates: 'xxx"),
    "template_with_bad_field": ({**BASE, "data": {"templates": ["{label} {x}" + HUGE]}}, "data.templates[0]: '{label}"),
    "unknown_method": ({"method": {"name": HUGE}}, "method.name: unknown method 'xxx"),
    "method_not_a_mapping": ({"method": [HUGE]}, "method: expected a method name"),
    "unknown_key": ({**BASE, "train": {HUGE: 1}}, "train.xxx"),
}


@pytest.mark.parametrize("case", list(HUGE_VALUES))
def test_huge_values_are_quoted_short(case):
    recipe, expected = HUGE_VALUES[case]
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert expected in str(caught.value) and len(str(caught.value)) < 600, str(caught.value)[:700]


@pytest.mark.parametrize(("override", "expected"), [
    ('data.templates=["a', "override 'data.templates=[\"a': the value is not valid YAML"),
    ("train.epochs={", "override 'train.epochs={': the value is not valid YAML"),
])
def test_override_that_is_not_yaml_is_a_recipe_error(override, expected, capsys):
    with pytest.raises(RecipeError) as caught:
        load_recipe(BASE, [override])
    assert expected in str(caught.value)
    assert main(["check", "recipes/quickstart.yaml", override]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["..", "../elsewhere", "/tmp/abs", "a/b", ""])
def test_output_name_must_stay_inside_output_dir(name):
    with pytest.raises(RecipeError, match="output.name: .* must be a plain folder name"):
        load_recipe({**BASE, "output": {"name": name}})


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RecipeError, match="output.dir: .* is a file, not a folder"):
        load_recipe({**BASE, "output": {"dir": str(tmp_path / "afile")}})


def test_grid_seeds_have_the_recipe_seed_range(tmp_path):
    from mmpeft.grids import load_compare_recipe

    path = tmp_path / "compare.yaml"
    path.write_text("# mmpeft compare compare.yaml\nmethod: lora\ngrid:\n  methods: [lora, full]\n  seeds: [0, -1]\n")
    with pytest.raises(RecipeError, match=r"grid.seeds\[1\]: -1 is out of range; it must be >= 0"):
        load_compare_recipe(path, [])



@pytest.mark.parametrize(("template", "expected"), [
    ("{label} {x}", "grid.templates[0]: '{label} {x}' has the unknown field {x}: only {label} is filled in"),
    ("{label} {0}", "grid.templates[0]: '{label} {0}' has the unknown field {0}"),
    ("{label} {", "grid.templates[0]: '{label} {' is not a valid template"),
])
def test_grid_templates_are_checked_like_data_templates(tmp_path, capsys, template, expected):
    """The zero-shot baselines of a compare grid formatted grid.templates at run time: a KeyError traceback."""
    from mmpeft.grids import load_compare_recipe

    path = tmp_path / "compare.yaml"
    path.write_text("grid:\n  methods: [lora]\n  seeds: [0]\n  templates: ['" + template + "']\n")
    with pytest.raises(RecipeError) as caught:
        load_compare_recipe(path, [])
    assert expected in str(caught.value)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize(("override", "expected"), [
    ("regulariser.strength=-1", "regulariser.strength: -1 is out of range; it must be >= 0"),
    ("regulariser.fisher_samples=0", "regulariser.fisher_samples: 0 is out of range; it must be >= 1"),
    ("regulariser={name: online_ewc, gamma: 1.5}", "regulariser.gamma: 1.5 is out of range"),
    ("regulariser={name: lwf, temperature: 0}", "regulariser.temperature: 0 is out of range; it must be > 0"),
    ("regulariser={name: replay, memory_size: 0}", "regulariser.memory_size: 0 is out of range"),
])
def test_regulariser_ranges(override, expected):
    from mmpeft.sequences.tasks import load_continual_recipe

    with pytest.raises(RecipeError, match=re.escape(expected)):
        load_continual_recipe("recipes/continual-ewc.yaml", [override])


def test_overrides_index_into_lists_and_name_a_bad_index(capsys):
    two = {**BASE, "data": {"templates": ["a {label}.", "the {label}."]}}
    recipe = load_recipe(two, ["data.templates.1=b {label}."])
    assert recipe.data.templates == ("a {label}.", "b {label}.")
    with pytest.raises(RecipeError) as caught:
        load_recipe({**BASE, "data": {"templates": ["a {label}."] * 300}}, ["data.templates.7x=c {label}."])
    message = str(caught.value)
    assert "override data.templates.7x: '7x' is not an index of data.templates (it has 300 items: 0 to 299)" in message
    assert len(message) < 300  # the 300 templates are not printed
    with pytest.raises(RecipeError, match=r"override train.epochs.x: train.epochs is not a section \(it is 5\)"):
        load_recipe(BASE, ["train.epochs=5", "train.epochs.x=1"])
    assert main(["check", "recipes/compare-methods.yaml", "grid.methods.1.r=16"]) == 0  # entry 1 is `lora`
    assert "- name: lora\n    r: 16\n  - dora" in capsys.readouterr().out


@pytest.mark.parametrize("tasks", ["3", "{a: 1}", "null"])
def test_continual_tasks_that_are_not_a_list(tasks):
    from mmpeft.sequences.tasks import load_continual_recipe

    with pytest.raises(RecipeError, match="tasks: required, a list of at least one task"):
        load_continual_recipe("recipes/continual-ewc.yaml", [f"tasks={tasks}"])
