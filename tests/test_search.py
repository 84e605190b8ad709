"""`mmpeft search` on a tiny CLIP: successive halving under a budget, validation-only trials, the chosen configurations
re-run over the seeds, resume, determinism, validation of the search section, the Pareto front, missing Optuna."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

import mmpeft
from mmpeft.core.schema import RecipeError
from mmpeft.grids.search_space import load_search_setup
from mmpeft.report.search_report import pareto_front

pytest.importorskip("optuna")

EPOCHS, MIN_EPOCHS, FACTOR, BUDGET = 3, 1, 3, 14
RUNGS = {MIN_EPOCHS * FACTOR**i for i in range(4) if MIN_EPOCHS * FACTOR**i <= EPOCHS}  # {1, 3}
LR = {"low": 1.0e-3, "high": 5.0e-2, "log": True}


def search_recipe(color_folder: Path, clip: Path, root: Path, name: str, **search) -> dict:
    return {
        "name": "colors", "seed": 0, "backbone": {"id": str(clip)},
        "data": {"source": "folder", "path": str(color_folder), "templates": ["a photo of a {label} image."],
                 "split": {"val": 0.25, "test": 0.25}},
        "train": {"epochs": EPOCHS, "batch_size": 8, "lr": 0.02, "warmup_ratio": 0.0},
        "eval": {"batch_size": 32}, "output": {"dir": str(root), "name": name},
        "grid": {"seeds": [0, 1]},
        "search": {"methods": [{"name": "lora", "r": {"choices": [2, 4]}, "alpha": 8, "train": {"lr": LR}},
                               {"name": "bitfit", "train": {"lr": LR}}],
                   "trials": 6, "budget": {"epochs": BUDGET}, "min_epochs": MIN_EPOCHS, "reduction_factor": FACTOR,
                   "top": 2, **search},
    }


def trial_table(grid: Path) -> list[dict]:
    with open(grid / "search" / "leaderboard.csv") as handle:
        return sorted(csv.DictReader(handle), key=lambda r: int(r["trial"]))


def drawn(rows: list[dict]) -> list[tuple]:
    return [(r["trial"], r["method"], r["params"], r["state"], r["epochs"], r["final_val"]) for r in rows]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("search")


@pytest.fixture(scope="module")
def searched(color_folder, tiny_clip_dir, root) -> tuple[dict, Path]:
    """6 trials over lora x bitfit x lr, rungs at epochs 1 and 3, then the best 2 over seeds [0, 1]."""
    result = mmpeft.search(search_recipe(color_folder, tiny_clip_dir, root, "full"))
    return result, root / "full"


def test_search_stays_in_budget_and_prunes_at_rungs(searched):
    result, grid = searched
    rows = trial_table(grid)
    assert [int(r["trial"]) for r in rows] == list(range(6)) and len(result["trials"]) == 6
    epochs = [int(r["epochs"]) for r in rows]
    assert sum(epochs) == result["budget"]["used"]["epochs"] <= BUDGET
    pruned = [r for r in rows if r["state"] == "pruned"]
    complete = [r for r in rows if r["state"] == "complete"]
    assert pruned and complete, [r["state"] for r in rows]
    assert all(int(r["epochs"]) in RUNGS - {EPOCHS} for r in pruned)  # stopped at a rung it did not pass
    assert all(int(r["epochs"]) == EPOCHS for r in complete)
    assert {r["method"] for r in rows} == {"lora", "bitfit"}
    for row in rows:  # each trial folder ran exactly the epochs the leaderboard counts
        metrics = json.loads((grid / row["dir"] / "metrics.json").read_text())
        assert metrics["train"]["epochs_run"] == int(row["epochs"])
        assert float(row["final_val"]) == metrics["train"]["history"][-1]["val_accuracy"]
    markdown = (grid / "search" / "leaderboard.md").read_text()
    assert sum(line.startswith("| ") for line in markdown.splitlines()) == 1 + len(rows)  # header + one per trial
    assert (grid / "search" / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert any(r["pareto_params"] == "yes" for r in complete) and all(r["pareto_params"] == "" for r in pruned)


def test_chosen_configurations_rerun_over_seeds_and_only_they_see_test(searched):
    result, grid = searched
    rows = trial_table(grid)
    done = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: (-float(r["final_val"]),
                                                                                int(r["trial"])))
    chosen = [f"t{r['trial']}-{r['method']}" for r in done[:2]]
    assert result["chosen"] == chosen
    with open(grid / "results.csv") as handle:
        cells = list(csv.DictReader(handle))
    assert sorted(c["cell"] for c in cells) == sorted(f"{label}-seed{s}" for label in chosen for s in (0, 1))
    for cell in cells:
        assert cell["status"] == "ok"
        test = json.loads((grid / "cells" / cell["cell"] / "metrics.json").read_text())["test"]
        assert "accuracy" in test and float(cell["accuracy"]) == test["accuracy"]
    for row in rows:
        metrics = json.loads((grid / row["dir"] / "metrics.json").read_text())
        assert set(metrics["test"]) == {"skipped"} and "zero_shot" not in metrics  # selection on validation only
        assert "accuracy" in metrics["val"]
    assert (grid / "compare.yaml").read_text().startswith(f"# mmpeft search --resume {grid}")
    from mmpeft.ui.catalog import classify

    assert classify(grid.parent, grid).kind == "search"  # the web workbench lists it as a search
    report = (grid / "report.md").read_text()
    assert "## Search" in report and "search/leaderboard.md" in report and "search/pareto.png" in report
    chosen_trial = int(chosen[0].split("-")[0][1:])
    saved = {e["label"]: e for e in __import__("yaml").safe_load((grid / "compare.yaml").read_text())["grid"]
             ["methods"]}
    params = dict(p.split("=") for p in rows[chosen_trial]["params"].split(", "))
    assert saved[chosen[0]]["train"]["lr"] == pytest.approx(float(params["train.lr"]), rel=1e-3)


def test_resume_keeps_trials_and_matches_an_uninterrupted_search(searched, color_folder, tiny_clip_dir, root):
    from mmpeft.cli import main

    _, full = searched
    grid = root / "resumed"
    mmpeft.search(search_recipe(color_folder, tiny_clip_dir, root, "resumed", trials=3, top=1), ["grid.seeds=[0]"])
    first = trial_table(grid)
    assert len(first) == 3
    assert main(["search", "--resume", str(grid), "search.trials=6"]) == 0
    after = trial_table(grid)
    assert drawn(after[:3]) == drawn(first)  # kept as they were
    assert len(after) == 6 and len(list((grid / "trials").iterdir())) == 6  # only the new ones ran
    assert drawn(after) == drawn(trial_table(full))  # same recipe + seed: the same trials, resumed or not

    with pytest.raises(RecipeError, match="other settings .*min_epochs"):
        mmpeft.search(None, ["search.min_epochs=2"], resume=grid)

    import optuna  # a driver killed mid-trial leaves a RUNNING trial: failed on resume, its epochs counted
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(grid / "search" / "study.log")))
    study = optuna.load_study(study_name="search", storage=storage)
    left = study.ask()
    left.set_user_attr("epochs", 1)
    result = mmpeft.search(None, ["search.trials=7"], resume=grid)
    last = trial_table(grid)[-1]
    assert (last["trial"], last["state"], last["epochs"]) == ("6", "failed", "1")
    assert result["budget"]["used"]["epochs"] == sum(int(r["epochs"]) for r in after) + 1


def test_gpu_hours_budget_stops_a_running_trial(color_folder, tiny_clip_dir, root):
    recipe = search_recipe(color_folder, tiny_clip_dir, root, "hours", budget={"gpu_hours": 1e-7}, top=1)
    with pytest.raises(ValueError, match="no trial completed") as caught:
        mmpeft.search(recipe)
    assert "search.budget.gpu_hours=..." in str(caught.value)  # the budget it was given, not an epochs one
    rows = trial_table(root / "hours")
    assert [(r["state"], r["epochs"]) for r in rows] == [("stopped", "1")]


def test_search_section_problems_in_one_error(color_folder, tiny_clip_dir, root):
    recipe = search_recipe(color_folder, tiny_clip_dir, root, "bad")
    recipe["data"]["split"] = {"val": 0.0, "test": 0.25}
    recipe["grid"]["methods"] = ["lora"]
    recipe["search"] = {
        "methods": [{"name": "lora", "r": {"choices": []}, "rr": {"choices": [4]},
                     "train": {"lr": {"low": 0.1, "high": 0.01}, "wd": 1}},
                    {"name": "lorra"},
                    {"name": "bitfit", "train": {"lr": {"low": 0.0, "high": 0.1, "log": True, "logg": 1}}}],
        "trails": 4, "budget": {}, "metric": "accuracy"}
    with pytest.raises(RecipeError) as caught:
        load_search_setup(recipe)
    text = "\n".join(caught.value.problems)
    for expected in ("search.trails: unknown key (did you mean 'trials'?)",
                     "search.budget: give epochs",
                     "search.metric: 'accuracy' is not a validation metric (did you mean 'val_accuracy'?)",
                     "search.methods[0].r.choices: expected a non-empty list",
                     "search.methods[0].rr: method 'lora' has no key 'rr' (did you mean 'r'?)",
                     "search.methods[0].train.lr: low 0.1 must be below high 0.01",
                     "search.methods[1]: unknown method 'lorra' (did you mean 'lora'?)",
                     "search.methods[2].train.lr: unknown key 'logg' (did you mean 'log'?)",
                     "search.methods[2].train.lr: log: true needs low > 0",
                     "grid.methods: a search picks the methods",
                     "search.methods[0].train.wd: unknown key"):
        assert expected in text, f"{expected!r} not in:\n{text}"

    good = search_recipe(color_folder, tiny_clip_dir, root, "checked")
    good["data"]["split"]["val"] = 0.0
    with pytest.raises(RecipeError, match="data.split.val: 0 leaves no validation split"):
        load_search_setup(good)


def _method0(**changes):
    return lambda search: search["methods"][0].update(changes)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda search: search.update(budget={"epochs": 0}), "search.budget.epochs: 0 is out of range; it must be >= 1"),
    (lambda search: search.update(budget={"epochs": -3}), "search.budget.epochs: -3 is out of range"),
    (lambda search: search.update(budget={"gpu_hours": 0}), "search.budget.gpu_hours: 0 is out of range"),
    (lambda search: search.update(budget="lots"), "search.budget: expected a mapping, got str 'lots'"),
    (lambda search: search.update(methods=None), "search.methods: expected a list, got None"),
    (lambda search: search.update(methods=[3]), "search.methods[0]: expected str or dict, got 3"),
    (_method0(r={"low": 2, "high": 8, "step": 0.5}), "search.methods[0].r: expected an integer, got 2.5"),
    (_method0(r={"low": 4, "high": 4}), "search.methods[0].r: low 4 must be below high 4"),
    (_method0(r={"low": 2.0, "high": 8}), "search.methods[0].r: expected an integer, got 2.0"),
    (lambda search: search["methods"][1].update(r={"choices": [2, 4]}),
     "search.methods[1].r: method 'bitfit' has no key 'r'"),
    (lambda search: search.update(metric="test_accuracy"), "a search selects on validation only"),
])
def test_search_space_mistakes_are_one_problem_each(color_folder, tiny_clip_dir, root, change, expected):
    """Wrong budgets and entries are problems with their search. path (no AttributeError/TypeError), and a step that
    draws values the key cannot take (r = 2.5) is caught before the first trial, not in it."""
    recipe = search_recipe(color_folder, tiny_clip_dir, root, "mistake")
    change(recipe["search"])
    problems = pytest.raises(RecipeError, load_search_setup, recipe).value.problems
    assert any(expected in p for p in problems), problems
    assert not any("NoneType" in p for p in problems), problems


def test_compare_on_a_search_recipe_says_to_run_mmpeft_search(color_folder, tiny_clip_dir, root):
    recipe = search_recipe(color_folder, tiny_clip_dir, root, "compared")
    (problem,) = pytest.raises(RecipeError, mmpeft.compare, recipe).value.problems
    assert problem == "search: this is a search recipe; run it with `mmpeft search`, not `mmpeft compare`"
    assert not (root / "compared").exists()


@pytest.mark.parametrize(("executor", "left", "expected"), [
    ("ray", "study.log", "its trials were run by Optuna"),
    ("sequential", "ray", "its trials were run on Ray Tune"),
])
def test_a_search_continues_only_under_the_scheduler_that_ran_its_trials(color_folder, tiny_clip_dir, root, executor,
                                                                         left, expected):
    """`--resume ... grid.executor=ray` on an Optuna search used to start Ray Tune from no trials over the old trial
    folders (they failed as `already holds a finished run`) and drop the Optuna trials from the leaderboard."""
    pytest.importorskip("ray.tune")
    recipe = search_recipe(color_folder, tiny_clip_dir, root, f"switched-{executor}")
    recipe["grid"]["executor"] = executor
    marker = root / f"switched-{executor}" / "search" / left
    marker.parent.mkdir(parents=True)
    marker.mkdir() if left == "ray" else marker.write_text("")
    with pytest.raises(RecipeError, match=expected) as caught:
        mmpeft.search(recipe)
    assert "or use another output.name" in "\n".join(caught.value.problems)
    assert sorted(p.name for p in marker.parent.parent.iterdir()) == ["search"]  # nothing written


def test_check_validates_a_search_recipe(color_folder, tiny_clip_dir, root, capsys):
    import yaml

    from mmpeft.cli import main

    path = root / "search.yaml"
    path.write_text(yaml.safe_dump(search_recipe(color_folder, tiny_clip_dir, root, "checked")))
    assert main(["check", str(path)]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["search"]["methods"][0]["r"] == {"choices": [2, 4]} and resolved["search"]["sampler_seed"] == 0
    assert main(["check", str(path), "search.reduction_factor=1"]) == 2
    assert "search.reduction_factor: 1 is out of range" in capsys.readouterr().err


def test_demo_search_pins_the_demo_kernels(monkeypatch, root):
    from mmpeft.cli import DEMO_NUMERICS, build_parser, pin_demo_numerics

    shipped = Path(__file__).resolve().parent.parent / "recipes" / "search-methods.yaml"
    (root / "pinned").mkdir(exist_ok=True)
    (root / "pinned" / "search.yaml").write_text(shipped.read_text())
    for argv in (["search", str(shipped)], ["search", "--resume", str(root / "pinned")]):
        for name in DEMO_NUMERICS:
            monkeypatch.delenv(name, raising=False)
        assert pin_demo_numerics(build_parser().parse_known_args(argv)[0]), argv


def test_shipped_search_recipe_loads():
    setup = load_search_setup(Path(__file__).resolve().parent.parent / "recipes" / "search-methods.yaml")
    assert setup.spec.budget.epochs and len(setup.entries) >= 2 and setup.compare.recipe.data.split.val > 0


def test_plan_sizes_each_method_at_its_hungriest_settings(color_folder, tiny_clip_dir, root):
    recipe = search_recipe(color_folder, tiny_clip_dir, root, "planned")
    recipe["search"]["methods"].append({"name": "bottleneck", "reduction_factor": {"choices": [2, 16]}})
    plans = {p["label"].split()[0]: p for p in mmpeft.plan(recipe, gpu_memory="24GiB")}
    assert list(plans) == ["lora", "bitfit", "bottleneck"] and "of 4 extremes" in plans["lora"]["label"]

    def trainable(method: dict) -> int:
        base = {k: v for k, v in recipe.items() if k not in ("grid", "search")}
        return mmpeft.plan({**base, "method": method}, gpu_memory="24GiB")[0]["trainable_params"]

    assert plans["lora"]["trainable_params"] == trainable({"name": "lora", "r": 4, "alpha": 8})  # the larger r
    assert plans["bottleneck"]["trainable_params"] == trainable({"name": "bottleneck", "reduction_factor": 2})


def test_ray_tune_asha_search(color_folder, tiny_clip_dir, root):
    """grid.executor: ray: Ray Tune's ASHA stops trials at rungs; the same outputs; --resume restores the experiment."""
    pytest.importorskip("ray.tune")
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as error:  # noqa: BLE001  (no Ray here: the Optuna tests cover the rest)
            pytest.skip(f"Ray cannot start on this machine: {error}")
    try:
        recipe = search_recipe(color_folder, tiny_clip_dir, root, "ray", trials=5, top=1)
        recipe["grid"].update(executor="ray", max_parallel=1, seeds=[0])
        result = mmpeft.search(recipe)
        grid = root / "ray"
        rows = trial_table(grid)
        assert sum(int(r["epochs"]) for r in rows) == result["budget"]["used"]["epochs"] <= BUDGET
        assert {r["state"] for r in rows} <= {"complete", "pruned", "stopped"}
        assert any(r["state"] == "pruned" for r in rows) and any(r["state"] == "complete" for r in rows)
        assert all(int(r["epochs"]) in RUNGS - {EPOCHS} for r in rows if r["state"] == "pruned")
        for row in (r for r in rows if r["state"] == "complete"):  # a complete trial's folder is a whole run folder
            metrics = json.loads((grid / row["dir"] / "metrics.json").read_text())
            assert metrics["train"]["epochs_run"] == EPOCHS and set(metrics["test"]) == {"skipped"}
        with open(grid / "results.csv") as handle:
            assert [c["cell"] for c in csv.DictReader(handle)] == [f"{result['chosen'][0]}-seed0"]
        again = mmpeft.search(None, resume=grid)  # restored: the same trials, the finished cell skipped
        assert drawn(trial_table(grid)) == drawn(rows) and again["chosen"] == result["chosen"]
        with pytest.raises(RecipeError, match="other settings .*trials"):  # Ray's experiment keeps its trial count
            mmpeft.search(None, ["search.trials=9"], resume=grid)
    finally:
        if started:
            ray.shutdown()


@pytest.mark.parametrize("points, front", [
    ([], []),
    ([(0.5, 10)], [0]),
    ([(0.9, 100), (0.8, 10), (0.7, 50), (0.95, 1000)], [0, 1, 3]),  # (0.7, 50) is beaten by (0.8, 10)
    ([(0.8, 10), (0.8, 10)], [0, 1]),  # equal points beat neither
    ([(0.8, 10), (0.8, 20), (0.7, 10)], [0]),  # same score at more cost, same cost at less score: beaten
])
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def test_missing_optuna_is_one_clear_error(monkeypatch, color_folder, tiny_clip_dir, root):
    from mmpeft.grids.search import import_optuna

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    for call in (lambda: load_search_setup(search_recipe(color_folder, tiny_clip_dir, root, "none")), import_optuna):
        with pytest.raises(RecipeError, match=r"pip install 'mmpeft\[search\]'"):
            call()
    assert not (root / "none").exists()
    shutil.rmtree(root / "none", ignore_errors=True)
