"""Recipes are strict: every problem is reported at once, with its YAML path and a did-you-mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from shipped import SHIPPED, prepare

from mmpeft.core.io import PROJECT_ROOT
from mmpeft.core.schema import RecipeError
from mmpeft.runs.recipe import load_recipe

PRESETS = sorted((PROJECT_ROOT / "adapters").glob("*.yaml"))


def problems_of(source, overrides=None) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(source, overrides)
    return caught.value.problems


def test_defaults_fill_every_section():
    recipe = load_recipe({"method": "lora"})
    assert recipe.method.r == 8 and recipe.train.epochs == 5 and recipe.data.source == "digits"


def test_unknown_key_names_path_and_suggests():
    (problem,) = problems_of({"method": "lora", "train": {"epocs": 3}})
    assert problem.startswith("train.epocs: unknown key") and "did you mean 'epochs'" in problem


def test_all_problems_reported_at_once():
    problems = problems_of({"method": {"name": "lora", "rr": 2, "towers": ["vison"]},
                            "train": {"lr": "fast", "batch_size": 1.5}, "data": {"shots": 0}})
    joined = "\n".join(problems)
    for expected in ("method.rr", "did you mean 'r'", "method.towers[0]: 'vison'", "did you mean 'vision'",
                     "train.lr: expected a number", "train.batch_size: expected an integer", "data.shots"):
        assert expected in joined
    assert len(problems) == 5


def test_unknown_method_lists_choices():
    (problem,) = problems_of({"method": {"name": "lorra"}})
    assert "method.name" in problem and "did you mean 'lora'" in problem and "zero_shot" in problem


def test_missing_files_rejected_before_loading(tmp_path):
    problems = problems_of({"method": "zero_shot", "backbone": {"id": str(tmp_path / "nope")},
                            "data": {"source": "csv", "path": str(tmp_path / "rows.csv")}})
    assert any(p.startswith("backbone.id: local directory") for p in problems)
    assert any(p.startswith("data.path: csv source") for p in problems)


def test_data_path_required_for_file_sources():
    (problem,) = problems_of({"method": "zero_shot", "data": {"source": "folder"}})
    assert "data.path is required" in problem


def test_preset_and_overrides(tmp_path):
    recipe = load_recipe({"method": "adapters/lora-r8.yaml"}, ["method.r=16", "train.epochs=2", "seed=7"])
    assert (recipe.method.name, recipe.method.r, recipe.train.epochs, recipe.seed) == ("lora", 16, 2, 7)
    recipe = load_recipe({"method": {"preset": "lora-vision-r8", "alpha": 4}})
    assert recipe.method.towers == ("vision",) and recipe.method.alpha == 4.0


def test_unknown_preset_suggests_close_name():
    (problem,) = problems_of({"method": "adapters/lora-r9.yaml"})
    assert "did you mean 'lora-r8'" in problem


def test_bad_override_syntax():
    (problem,) = problems_of({"method": "lora"}, ["train.epochs"])
    assert "expected key.sub=value" in problem


def test_template_needs_placeholder():
    (problem,) = problems_of({"method": "lora", "data": {"templates": ["a photo"]}})
    assert "{label}" in problem


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe({"method": "adapters/lora-r8.yaml", "train": {"epochs": 2}})
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe.to_yaml())
    again = load_recipe(path)
    assert again.replace(name=recipe.name) == recipe


def test_recipe_file_errors_name_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("method: lora\ntrain: [1, 2\n")
    (problem,) = problems_of(path)
    assert str(path) in problem and "not valid YAML" in problem


def recipe_loaders() -> dict:
    """How each command loads its recipe; a command that adds recipe sections adds its loader here."""
    from mmpeft.grids import load_compare_recipe, load_fewshot_recipe
    from mmpeft.grids.search_space import load_search_setup
    from mmpeft.sequences import load_continual_recipe

    return {"run": load_recipe, "compare": load_compare_recipe, "fewshot": load_fewshot_recipe,
            "continual": load_continual_recipe, "search": load_search_setup}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# mmpeft "), f"{path.name} must begin with the command that runs it"
    command = first_line.split()[2]
    loaders = recipe_loaders()
    assert command in loaders, f"{path.name}: no loader for `mmpeft {command}` in recipe_loaders()"
    loaders[command](path)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_validates(path: Path):
    assert "name" in yaml.safe_load(path.read_text())
    load_recipe({"method": str(path)})


def test_tensorboard_tracking_needs_the_package():
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        (problem,) = problems_of({"method": "lora", "train": {"log_with": "tensorboard"}})
        assert "pip install tensorboard" in problem
    else:
        assert load_recipe({"method": "lora", "train": {"log_with": "tensorboard"}}).train.log_with == ("tensorboard",)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_mmpeft_check_accepts_every_shipped_recipe(path: Path, capsys, tmp_path, monkeypatch):
    """`check` reads the data too: shards a recipe's header says to write first are written (tests/shipped.py)."""
    from mmpeft.cli import main

    prepare(path, tmp_path, monkeypatch)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "backbone:" in out
    reads_rows = "source: digits" not in out and "stream: true" not in out
    assert ("# data:" in out) == reads_rows, out[:300]


def test_select_metric_loss_is_only_for_conversation_data():
    with pytest.raises(RecipeError, match=r"train.select_metric: 'loss' is the val assistant-token loss of "
                                          r"conversation data .*data.source: digits selects by accuracy"):
        load_recipe({"method": "lora", "train": {"select_metric": "loss"}})


@pytest.mark.parametrize(("override", "expected"), [
    ("data.path=runs/none-{0000..0003}.tar", "'runs/none-{0000..0003}.tar': 4 of 4 shards do not exist"),
    ("data.image_column=photo", "photo"),
])
def test_mmpeft_check_reads_caption_and_shard_rows(override, expected, capsys):
    from mmpeft.cli import main

    recipe = "recipes/shards-clip.yaml" if "tar" in override else "recipes/captions-clip.yaml"
    assert main(["check", recipe, override]) == 2
    assert expected in capsys.readouterr().err
