"""Compare / few-shot grids on a tiny CLIP: tables match cells, stats match hand computations, resume, failures,
shared splits and samples, and the frozen-tower feature cache (same numbers with and without it)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import mmpeft
from mmpeft.core.schema import RecipeError
from mmpeft.data import load_data
from mmpeft.grids import load_setup, plan_cells
from mmpeft.report.stats import paired_test, summarize
from mmpeft.runs import single as pipeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LORA_TEXT = {"name": "lora", "r": 2, "alpha": 4, "towers": ["text"], "label": "lora-text"}


def grid_recipe(color_recipe: dict, grid: dict, epochs: int = 1) -> dict:
    recipe = {k: v for k, v in color_recipe.items() if k != "method"}
    recipe["train"] = {**recipe["train"], "epochs": epochs, "batch_size": 12}
    recipe["output"] = {**recipe["output"], "name": "grid"}
    return {**recipe, "grid": grid}


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000, path


def test_compare_grid_rows_match_cells_with_table_and_plots(color_recipe, tmp_path):
    recipe = grid_recipe(color_recipe, {"methods": ["full", LORA_TEXT, "linear_probe"], "seeds": [0, 1]})
    result = mmpeft.compare(recipe)
    grid = tmp_path / "runs" / "grid"
    with open(grid / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["cell"] for r in rows] == ["full-seed0", "lora-text-seed0", "linear_probe-seed0",
                                         "full-seed1", "lora-text-seed1", "linear_probe-seed1"]
    for row in rows:
        metrics = json.loads((grid / "cells" / row["cell"] / "metrics.json").read_text())
        assert row["status"] == "ok" and float(row["accuracy"]) == metrics["test"]["accuracy"]
        assert float(row["macro_f1"]) == metrics["test"]["macro_f1"]
        assert int(row["trainable_params"]) == metrics["params"]["trainable"]
        assert float(row["train_seconds"]) == metrics["train"]["seconds"]
        assert row["feature_cache"] == str(row["method"] != "full")  # frozen image tower -> cached features
    assert len({r["test_split"] for r in rows}) == 1
    assert rows[0]["train_sample"] == rows[1]["train_sample"] == rows[2]["train_sample"]

    summary = {g["method"]: g for g in json.loads((grid / "summary.json").read_text())}
    accuracies = [float(r["accuracy"]) for r in rows if r["method"] == "linear_probe"]
    assert summary["linear_probe"]["accuracy"]["mean"] == pytest.approx(sum(accuracies) / 2)
    assert summary["full"]["paired"] is None and summary["lora-text"]["paired"]["n"] == 2
    table = (grid / "summary.md").read_text()
    assert "| lora-text | 2 |" in table and "vs full (paired t-test" in table and "**" in table
    report = (grid / "report.md").read_text()
    for expected in ("## Protocol", "split seed 0", "every method trained on the same examples",
                     "adapters/full.yaml", "## Zero-shot baselines", "recipe prompts", "![accuracy_vs_params.png]"):
        assert expected in report, expected
    for name in ("accuracy_vs_params.png", "accuracy_vs_time.png"):
        assert_png(grid / name)
    assert result["zero_shot"]["rows"][0]["prompts"] == "recipe prompts = a photo of a {label} image."
    assert len(result["rows"]) == 6


def test_fewshot_via_cli_has_shots_plot_and_nested_samples(color_recipe, tmp_path):
    from mmpeft.cli import main

    recipe = grid_recipe(color_recipe, {"methods": ["linear_probe"], "seeds": [0], "shots": [1, 2],
                                        "templates": ["photo"]})
    path = tmp_path / "fewshot.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["fewshot", str(path)]) == 0
    grid = tmp_path / "runs" / "grid"
    for k in (1, 2):
        metrics = json.loads((grid / "cells" / f"linear_probe-k{k}-seed0" / "metrics.json").read_text())
        assert metrics["data"]["class_counts"]["train"] == [k, k, k]
    assert_png(grid / "accuracy_vs_shots.png")
    zero_shot = json.loads((grid / "zero_shot.json").read_text())["rows"]
    kinds = [row["kind"] for row in zero_shot]
    assert kinds[0] == "recipe" and kinds.count("template") == 5 and kinds[-1] == "ensemble"
    assert "### k = 2" in (grid / "summary.md").read_text()


def test_cells_share_split_and_k_shot_sample(color_recipe, tmp_path):
    recipe = grid_recipe(color_recipe, {"methods": ["linear_probe", LORA_TEXT], "seeds": [0, 1], "shots": [1, 3]})
    setup = load_setup(recipe)
    train = {}
    test = set()
    for cell in plan_cells(setup, tmp_path / "grid"):
        data = load_data(cell.recipe.data, cell.recipe.seed)
        test.add(tuple(e.image for e in data.test) + tuple(e.image for e in data.val))
        train.setdefault((cell.seed, cell.shots), set()).add(tuple(e.image for e in data.train))
    assert len(test) == 1  # one split for every cell, whatever its seed
    assert all(len(samples) == 1 for samples in train.values())  # same sample for every method at (seed, k)
    (small,), (large,) = train[(0, 1)], train[(0, 3)]
    assert set(small) < set(large)  # nested in k
    assert train[(0, 3)] != train[(1, 3)]  # the seed draws the sample


def test_summary_and_paired_test_match_hand_computation():
    full = {0: 0.80, 1: 0.85, 2: 0.90, 3: 0.82}
    lora = {0: 0.78, 1: 0.86, 2: 0.85, 3: 0.80}
    s = summarize(list(lora.values()))
    mean = (0.78 + 0.86 + 0.85 + 0.80) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in lora.values()) / 3)
    t_crit = 3.182446305284263  # Student t, 97.5% quantile, 3 degrees of freedom
    assert (s.n, s.mean, s.std) == (4, pytest.approx(mean), pytest.approx(std))
    assert (s.ci_low, s.ci_high) == (pytest.approx(mean - t_crit * std / 2), pytest.approx(mean + t_crit * std / 2))

    d = [lora[i] - full[i] for i in range(4)]  # -0.02, 0.01, -0.05, -0.02
    d_mean = sum(d) / 4
    d_std = math.sqrt(sum((x - d_mean) ** 2 for x in d) / 3)
    test = paired_test(lora, full)
    assert test.n == 4 and test.mean_difference == pytest.approx(-0.02)
    assert test.t == pytest.approx(d_mean / (d_std / 2))  # -1.6329931618554523
    assert test.p == pytest.approx(0.20097, abs=1e-4) and test.verdict.startswith("not distinguishable")

    strong = paired_test({0: 0.9, 1: 0.95, 2: 0.93}, {0: 0.5, 1: 0.52, 2: 0.51})
    assert strong.p < 0.05 and strong.verdict.startswith("distinguishable")
    assert math.isnan(summarize([0.7]).std) and math.isnan(summarize([0.7]).ci_low)
    one = paired_test({0: 0.7}, {0: 0.6})
    assert math.isnan(one.p) and "needs >= 2 seeds" in one.verdict
    assert paired_test({0: 0.7, 1: 0.8}, {0: 0.7, 1: 0.8}).verdict.startswith("identical")
    assert "every seed" in paired_test({0: 0.7, 1: 0.8}, {0: 0.6, 1: 0.7}).verdict


def test_failed_cell_is_recorded_and_rerun_skips_finished_cells(color_recipe, tmp_path, monkeypatch):
    recipe = grid_recipe(color_recipe, {"methods": ["zero_shot", "linear_probe"], "seeds": [0, 1]})
    original = pipeline.execute
    calls: list[str] = []

    def flaky(recipe, run_dir, resume=False, **options):
        calls.append(run_dir.name)
        if run_dir.name == "linear_probe-seed0":
            raise RuntimeError("boom: simulated failure")
        if run_dir.name == "linear_probe-seed1" and len(calls) == 4:
            raise KeyboardInterrupt  # the first attempt is interrupted here
        return original(recipe, run_dir, resume, **options)

    monkeypatch.setattr(pipeline, "execute", flaky)
    with pytest.raises(KeyboardInterrupt):
        mmpeft.compare(recipe)
    grid = tmp_path / "runs" / "grid"
    rows = json.loads((grid / "results.json").read_text())["rows"]
    assert [(r["cell"], r["status"]) for r in rows] == [("zero_shot-seed0", "ok"), ("linear_probe-seed0", "failed"),
                                                        ("zero_shot-seed1", "ok")]  # went on after the failure
    assert "boom: simulated failure" in rows[1]["error"]
    assert "RuntimeError" in (grid / "cells" / "linear_probe-seed0" / "error.txt").read_text()

    calls.clear()
    result = mmpeft.compare(None, resume=grid)  # finished cells are skipped; failed and interrupted ones run
    assert calls == ["linear_probe-seed0", "linear_probe-seed1"]
    assert [r["status"] for r in result["rows"]] == ["ok", "failed", "ok", "ok"]
    report = (grid / "report.md").read_text()
    assert "## Failed cells" in report and "boom" in report
    assert "1 (1 failed)" in (grid / "summary.md").read_text()
    with pytest.raises(RecipeError, match="zero_shot-seed0 finished with other settings .*train.epochs: 1 -> 2"):
        mmpeft.compare(None, ["train.epochs=2"], resume=grid)  # never mix budgets in one table
    saved = grid / "cells" / "zero_shot-seed0" / "recipe.yaml"  # as a version before eval.test existed saved it
    saved.write_text(saved.read_text().replace("  test: true\n", ""))
    assert "test:" not in yaml.safe_load(saved.read_text())["eval"]
    calls.clear()
    assert [r["status"] for r in mmpeft.compare(None, resume=grid)["rows"]] == ["ok", "failed", "ok", "ok"]
    assert calls == ["linear_probe-seed0"]  # a key added since, at its default, is no change of settings


def test_cached_and_uncached_runs_give_identical_metrics(color_recipe):
    recipe = {**color_recipe, "method": {k: v for k, v in LORA_TEXT.items() if k != "label"}}
    cached = mmpeft.run(recipe, ["output.name=cached", "train.epochs=2"])
    plain = mmpeft.run(recipe, ["output.name=plain", "train.epochs=2", "train.feature_cache=recompute"])
    assert cached["feature_cache"]["used"] and not plain["feature_cache"]["used"]
    assert cached["feature_cache"]["reused"] > 0
    assert cached["test"] == plain["test"] and cached["zero_shot"] == plain["zero_shot"]
    assert cached["train"]["history"] == plain["train"]["history"]


@pytest.mark.parametrize(("method", "frozen"), [
    ({"name": "zero_shot"}, True), ({"name": "linear_probe"}, True), ({"name": "coop", "n_ctx": 4}, True),
    ({"name": "lora", "towers": ["text"]}, True), ({"name": "full", "towers": ["text"]}, True),
    ({"name": "lora", "towers": ["vision"]}, False), ({"name": "full"}, False), ({"name": "vpt", "n_tokens": 2}, False),
])
def test_methods_declare_whether_the_image_tower_stays_frozen(color_recipe, method, frozen):
    from mmpeft.backbones import load_backbone
    from mmpeft.methods import METHODS

    recipe = mmpeft.load_recipe({**color_recipe, "method": method})
    data = load_data(recipe.data, 0)
    backbone = load_backbone(recipe.backbone)
    applied = METHODS.get(recipe.method.name)()
    applied.apply(backbone, recipe.method, data.labels)
    assert applied.image_tower_frozen(backbone, recipe.method) is frozen


def test_stale_cached_features_fall_back_to_recomputing(color_recipe, caplog):
    from mmpeft.backbones import load_backbone
    from mmpeft.features import FeatureCache, FeatureDataset, bind_features

    recipe = mmpeft.load_recipe(color_recipe)
    data = load_data(recipe.data, 0)
    backbone = load_backbone(recipe.backbone)
    binding = bind_features(recipe, backbone)
    binding.cache = FeatureCache()
    first = binding.wrap(data.dataset("test"))
    assert isinstance(first, FeatureDataset) and binding.computed == len(data.test)
    with torch.no_grad():  # change the image path behind the cache's back (same files, so same fingerprint)
        backbone.model.visual_projection.weight.mul_(-1)
    assert not isinstance(binding.wrap(data.dataset("test")), FeatureDataset)
    assert not binding.enabled and "differ from this model's" in caplog.text


def test_compare_recipe_problems_are_reported_at_once(color_recipe):
    recipe = grid_recipe(color_recipe, {"methods": ["lora", "lorra", {"preset": "lora-r8", "rr": 2},
                                                    {"name": "full", "label": "lora"}],
                                        "seeds": [1, 1], "shotz": [1], "baseline": "fulll"})
    recipe["method"] = "lora"
    with pytest.raises(RecipeError) as caught:
        load_setup(recipe, ["train.epocs=2"])
    joined = "\n".join(caught.value.problems)
    for expected in ("method: a compare recipe takes its methods from grid.methods", "grid.shotz: unknown key",
                     "grid.methods[1]: 'lorra' is neither a method", "grid.methods[2].rr: unknown key",
                     "grid.seeds: [1, 1] repeats a seed", "train.epocs: unknown key", "label 'lora' appears 2",
                     "grid.baseline: 'fulll'"):
        assert expected in joined, expected


def test_bare_names_map_to_presets_or_defaults(color_recipe):
    setup = load_setup(grid_recipe(color_recipe, {"methods": ["lora", "dora", "houlsby", "zero_shot",
                                                              {"preset": "lora-r8", "r": 4, "label": "lora-r4"}]}),
                       command="fewshot")
    sources = {e.label: e.source for e in setup.methods}
    assert sources["lora"] == "adapters/lora-r8.yaml" and sources["dora"] == "adapters/dora-r8.yaml"
    assert sources["houlsby"] == "adapters/houlsby.yaml" and sources["zero_shot"].startswith("defaults of")
    assert {e.label: e.config for e in setup.methods}["lora-r4"].r == 4
    assert setup.grid.shots == (1, 2, 4, 8, 16) and setup.baseline is None


def test_disk_feature_cache_is_read_by_a_fresh_process_cache(color_recipe, tmp_path, monkeypatch):
    from mmpeft.backbones import load_backbone
    from mmpeft.features import FeatureBinding, FeatureCache, backbone_fingerprint

    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    recipe = mmpeft.load_recipe(color_recipe)
    data = load_data(recipe.data, 0)
    backbone = load_backbone(recipe.backbone)
    fingerprint = backbone_fingerprint(recipe.backbone, backbone.name_or_path)
    first = FeatureBinding(backbone, fingerprint, 32, disk=True, cache=FeatureCache())
    written = first.wrap(data.dataset("val")).features
    assert list((tmp_path / "cache" / "features" / fingerprint).glob("*.safetensors"))
    again = FeatureBinding(backbone, fingerprint, 32, disk=True, cache=FeatureCache())  # as a new process would
    assert torch.equal(again.wrap(data.dataset("val")).features, written)
    assert (again.computed, again.reused) == (0, len(data.val))


# --- regularisers as the grid axis (continual recipes) ----------------------------------------------------------------
def regulariser_grid(color_recipe: dict, grid: dict) -> dict:
    """A 2-task class-incremental sequence on the colour folder, one quick epoch per task."""
    return {**color_recipe, "train": {**color_recipe["train"], "epochs": 1, "batch_size": 12},
            "data": {**color_recipe["data"], "split": {"val": 0.0, "test": 0.25}},
            "tasks": [{"classes": ["red", "green"]}, {"name": "rest", "classes": ["blue"]}],
            "output": {**color_recipe["output"], "name": "grid"}, "grid": {"kind": "regularisers", **grid}}


def test_regulariser_grid_table_matches_cells_and_resumes(color_recipe, tmp_path, monkeypatch):
    from mmpeft.sequences import runner

    recipe = regulariser_grid(color_recipe, {"regularisers": ["naive", {"name": "ewc", "strength": 10}],
                                             "seeds": [0, 1]})
    original = runner.execute
    calls: list[str] = []
    failed: list[str] = []

    def flaky(recipe, run_dir, resume=False):
        calls.append(run_dir.name)
        if run_dir.name == "colors-naive-seed1" and not failed:  # fails on its first attempt only
            failed.append(run_dir.name)
            raise RuntimeError("boom: simulated failure")
        return original(recipe, run_dir, resume)

    monkeypatch.setattr(runner, "execute", flaky)
    first = mmpeft.compare(recipe)
    grid = tmp_path / "runs" / "grid"
    assert [(r["cell"], r["status"]) for r in first["rows"]] == [
        ("colors-naive-seed0", "ok"), ("colors-ewc-seed0", "ok"), ("colors-naive-seed1", "failed"),
        ("colors-ewc-seed1", "ok")]  # the grid went on after the failure
    assert "boom" in (grid / "report.md").read_text()
    assert (grid / "cells" / "colors-naive-seed1" / "error.txt").is_file()

    calls.clear()
    result = mmpeft.compare(None, resume=grid)
    assert calls == ["colors-naive-seed1"]  # finished cells are reused, only the failed one runs again
    with open(grid / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["ok"] * 4
    for row in rows:
        summary = json.loads((grid / "cells" / row["cell"] / "metrics.json").read_text())["summary"]
        for key in ("average_accuracy", "average_forgetting", "backward_transfer"):
            assert float(row[key]) == summary[key], (row["cell"], key)
    groups = {g["regulariser"]: g for g in result["summary"]}
    ewc = [float(r["average_forgetting"]) for r in rows if r["regulariser"] == "ewc"]
    assert groups["ewc"]["average_forgetting"]["mean"] == pytest.approx(sum(ewc) / 2)
    assert groups["naive"]["paired"] is None and groups["ewc"]["paired"]["average_forgetting"]["n"] == 2
    table = (grid / "summary.md").read_text()
    assert "| ewc | 2 |" in table and "vs naive: average forgetting (paired t-test)" in table
    assert "## Failed cells" not in (grid / "report.md").read_text()
    assert_png(grid / "forgetting_vs_accuracy.png")
    with pytest.raises(RecipeError, match="colors-naive-seed0 was run with other settings .*train.epochs: 1 -> 2"):
        mmpeft.compare(None, ["train.epochs=2"], resume=grid)


def test_regulariser_grid_problems_are_reported_clearly(color_recipe):
    both = regulariser_grid(color_recipe, {"methods": ["lora"], "regularisers": ["naive", "ewcc"], "shots": [1]})
    both["regulariser"] = "ewc"
    problems = "\n".join(pytest.raises(RecipeError, load_setup, both).value.problems)
    for expected in ("grid: lists both `methods` and `regularisers`", "grid.regularisers[1]: unknown regulariser "
                     "'ewcc' (did you mean 'ewc'?)", "regulariser: a regularisers grid takes each regulariser",
                     "grid.shots: not used by a regularisers grid"):
        assert expected in problems, expected
    plain = grid_recipe(color_recipe, {"kind": "regularisers", "regularisers": ["naive", "ewc"]})
    (problem,) = pytest.raises(RecipeError, load_setup, plain).value.problems
    assert problem.startswith("grid.regularisers: needs a continual recipe, one with `tasks:`")
    problems = pytest.raises(RecipeError, load_setup, regulariser_grid(color_recipe, {"regularisers": ["naive"]}),
                             command="fewshot").value.problems
    assert any("runs with `mmpeft compare`, not `mmpeft fewshot`" in p for p in problems)


# --- in-context prompting beside LoRA (generative fewshot) ------------------------------------------------------------
def test_generative_fewshot_puts_in_context_and_lora_rows_in_one_table(color_folder, tmp_path):
    from mmpeft.testing import tiny_backbone

    recipe = {"name": "gen", "backbone": {"id": str(tiny_backbone("llava"))},
              "data": {"source": "folder", "path": str(color_folder), "question": "What colour is this image?",
                       "split": {"val": 0.0, "test": 0.25}},
              "train": {"objective": "generative", "epochs": 2, "batch_size": 6, "lr": 0.01},
              "eval": {"batch_size": 16}, "output": {"dir": str(tmp_path / "runs"), "name": "grid"},
              "grid": {"methods": [{"name": "lora", "r": 4, "alpha": 8}], "seeds": [0], "shots": [0, 2],
                       "strategies": ["random", "nearest"]}}
    mmpeft.fewshot(recipe)
    grid = tmp_path / "runs" / "grid"
    with open(grid / "results.csv") as handle:
        rows = {r["cell"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["icl-random-k0-seed0", "icl-nearest-k0-seed0", "icl-random-k2-seed0",
                          "icl-nearest-k2-seed0", "lora-k2-seed0"]
    assert rows["icl-random-k0-seed0"]["accuracy"] == rows["icl-nearest-k0-seed0"]["accuracy"]  # no demos: same
    metrics = json.loads((grid / "cells" / "lora-k2-seed0" / "metrics.json").read_text())
    assert float(rows["lora-k2-seed0"]["accuracy"]) == metrics["test"]["accuracy"]
    assert rows["icl-nearest-k2-seed0"]["trainable_params"] == "0" and rows["icl-nearest-k2-seed0"]["strategy"]
    saved = json.loads((grid / "icl" / "seed0.json").read_text())["rows"]
    assert {r["n"] for r in saved} == {metrics["test"]["n"]} == {18}  # every test image a query, as for the cells
    two = (grid / "summary.md").read_text().split("### k = 2")[1]
    assert "| icl-random | 1 |" in two and "| icl-nearest | 1 |" in two and "| lora | 1 |" in two
    assert "zero-shot (in-context, k = 0)" in two and not (grid / "zero_shot.json").exists()
    assert "In-context prompting (rows `icl-<strategy>`" in (grid / "report.md").read_text()
    assert_png(grid / "icl" / "icl_accuracy.png")
    assert_png(grid / "accuracy_vs_shots.png")


def test_in_context_settings_are_refused_where_they_cannot_run(color_recipe):
    recipe = grid_recipe(color_recipe, {"methods": ["linear_probe"], "seeds": [0], "shots": [0, 1],
                                        "strategies": ["random"]})
    problems = "\n".join(pytest.raises(RecipeError, load_setup, recipe).value.problems)  # compare: no k sweep
    assert "grid.shots: [0, 1] must be distinct integers >= 1" in problems
    assert "grid.strategies: in-context prompting sweeps k, so it runs in `mmpeft fewshot`" in problems
    with pytest.raises(RecipeError) as caught:  # fewshot, but a dual encoder: refused before any cell runs
        mmpeft.fewshot(recipe)
    joined = "\n".join(caught.value.problems)
    assert "grid.strategies: in-context prompting needs a generative backbone" in joined
    assert "grid.shots: k = 0 is in-context prompting's zero-shot row" in joined
