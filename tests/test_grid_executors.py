"""Grid executors on a tiny CLIP: the same per-cell metrics in this process, a pool of 2 worker processes and a local
Ray with 2 CPUs; a cell that raises is recorded as failed while the others finish, and a resume (under another
executor too) re-runs only it. Plus the recipe checks of grid.kind and the executor keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import mmpeft
from mmpeft.core.schema import RecipeError
from mmpeft.grids import load_setup

CELLS = ["zero_shot-seed0", "linear_probe-seed0", "zero_shot-seed1", "linear_probe-seed1"]
BLOCKED = "linear_probe-seed1"  # the cell made to raise: a folder where its recipe.yaml must be written


def executor_grid(color_folder: Path, tiny_clip_dir: Path, root: Path, executor: str) -> dict:
    """4 cells (2 methods x 2 seeds) on the colour folder; only the executor differs between grids."""
    return {"name": "colors", "seed": 0, "backbone": {"id": str(tiny_clip_dir)},
            "data": {"source": "folder", "path": str(color_folder), "templates": ["a photo of a {label} image."],
                     "split": {"val": 0.25, "test": 0.25}},
            "train": {"epochs": 2, "batch_size": 12, "lr": 0.05, "warmup_ratio": 0.0}, "eval": {"batch_size": 32},
            "output": {"dir": str(root), "name": executor},
            "grid": {"methods": ["zero_shot", "linear_probe"], "seeds": [0, 1], "executor": executor,
                     "max_parallel": 2, "threads_per_cell": 1}}


def cell_numbers(grid: Path, cell: str) -> dict:
    """What must not depend on who ran the cell: test scores, validation history, data fingerprints, sizes."""
    metrics = json.loads((grid / "cells" / cell / "metrics.json").read_text())
    history = [{k: v for k, v in h.items() if k.startswith("val_")} for h in (metrics.get("train") or {})
               .get("history", [])]
    test = {k: metrics["test"][k] for k in ("accuracy", "macro_f1", "n", "per_class", "confusion_matrix")}
    return {"test": test, "history": history, "fingerprints": metrics["data"]["fingerprints"],
            "params": metrics["params"], "seed": metrics["seed"]}


@pytest.fixture(scope="module")
def sequential_grid(tmp_path_factory, color_folder, tiny_clip_dir) -> Path:
    """The reference: every cell in this process, one after another."""
    root = tmp_path_factory.mktemp("sequential")
    mmpeft.compare(executor_grid(color_folder, tiny_clip_dir, root, "sequential"))
    return root / "sequential"


@pytest.fixture
def local_ray():
    """A local Ray with 2 CPUs for the test (the grid joins it instead of starting its own); skipped, with the
    reason, only where Ray is not installed or cannot start."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mmpeft[ray]')")
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as error:  # noqa: BLE001  (any reason Ray cannot start here is a reason to skip)
        pytest.skip(f"a local Ray cannot start here: {type(error).__name__}: {error}")
    yield ray
    ray.shutdown()


@pytest.mark.parametrize(("executor", "resume_with"), [("processes", "processes"), ("ray", "sequential")])
def test_executors_give_sequential_metrics_record_a_failure_and_resume_only_it(
        sequential_grid, color_folder, tiny_clip_dir, tmp_path, request, monkeypatch, executor, resume_with):
    if executor == "ray":
        request.getfixturevalue("local_ray")
    else:  # a cache folder of its own: what the workers share is seen there
        monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    grid = tmp_path / executor
    (grid / "cells" / BLOCKED / "recipe.yaml").mkdir(parents=True)  # writing the cell's recipe.yaml will raise
    first = mmpeft.compare(executor_grid(color_folder, tiny_clip_dir, tmp_path, executor))
    assert [(r["cell"], r["status"]) for r in first["rows"]] == [
        (cell, "failed" if cell == BLOCKED else "ok") for cell in CELLS]  # plan order, the others finished
    failed = next(r for r in first["rows"] if r["status"] == "failed")
    assert failed["error"].startswith("IsADirectoryError") and "recipe.yaml" in failed["error"]
    assert "IsADirectoryError" in (grid / "cells" / BLOCKED / "error.txt").read_text()
    for cell in CELLS:
        if cell != BLOCKED:
            assert cell_numbers(grid, cell) == cell_numbers(sequential_grid, cell), (executor, cell)

    shutil.rmtree(grid / "cells" / BLOCKED / "recipe.yaml")
    finished = {cell: (grid / "cells" / cell / "metrics.json").stat().st_mtime_ns for cell in CELLS if cell != BLOCKED}
    again = mmpeft.compare(None, [f"grid.executor={resume_with}"], resume=grid)
    assert [r["status"] for r in again["rows"]] == ["ok"] * 4
    assert {cell: (grid / "cells" / cell / "metrics.json").stat().st_mtime_ns for cell in finished} == finished
    assert cell_numbers(grid, BLOCKED) == cell_numbers(sequential_grid, BLOCKED)
    if executor == "processes":  # the resumed cell's fresh worker read the features the first workers computed
        features = json.loads((grid / "cells" / BLOCKED / "metrics.json").read_text())["feature_cache"]
        assert features["disk"] and features["computed"] == 0 and features["reused"] > 0
        assert any((tmp_path / "cache" / "images").rglob("*.npy"))  # decoded images shared too
    assert not (grid / "cells" / BLOCKED / "error.txt").exists()
    saved = json.loads((grid / "results.json").read_text())["rows"]
    assert [r["accuracy"] for r in saved] == [r["accuracy"] for r in again["rows"]]
    assert yaml.safe_load((grid / "compare.yaml").read_text().split("\n", 2)[2])["grid"]["executor"] == resume_with


@pytest.mark.parametrize(("grid", "expected"), [
    ({"kind": "regulariser", "regularisers": ["naive"]}, "grid.kind: unknown grid kind 'regulariser' (did you mean "
                                                         "'regularisers'?); valid: fewshot, methods, regularisers"),
    ({"regularisers": ["naive"]}, "add `grid.kind: regularisers`"),
    ({"methods": ["lora"], "executor": "rey"}, "grid.executor: 'rey' is not an executor (did you mean 'ray'?)"),
    ({"methods": ["lora"], "executor": None}, "grid.executor: expected a string, got "),  # `executor:` left empty:
    ({"methods": ["lora"], "executor": 2}, "grid.executor: expected a string, got 2"),  # a TypeError traceback
    ({"methods": ["lora"], "executor": "processes", "gpus_per_cell": 0.5},
     "grid.gpus_per_cell: 0.5 is a fraction; the processes executor gives whole CPUs/GPUs"),
    ({"methods": ["lora"], "max_parallel": 0}, "grid.max_parallel: 0 is out of range; it must be >= 1"),
    ({"methods": ["lora"], "ray_address": "auto"}, "grid.ray_address: set, but grid.executor is 'sequential'"),
    ({"methods": [1, "lora"]}, "grid.methods[0]: expected str or dict, got 1"),  # was a TypeError traceback
    ({"methods": [None]}, "grid.methods[0]: expected str or dict, got None"),
    ({"methods": ["lora"], "shots": [1.5]}, "grid.shots[0]: expected an integer, got 1.5"),  # was a TypeError
])
def test_grid_kind_and_executor_keys_are_checked_before_anything_runs(color_recipe, grid, expected):
    recipe = {**{k: v for k, v in color_recipe.items() if k != "method"}, "grid": grid}
    problems = "\n".join(pytest.raises(RecipeError, load_setup, recipe).value.problems)
    assert expected in problems


def test_a_continual_recipe_needs_the_regularisers_kind_declared(color_recipe):
    recipe = {**color_recipe, "tasks": [{"classes": ["red", "green"]}, {"classes": ["blue"]}],
              "grid": {"regularisers": ["naive", "ewc"]}}
    (problem,) = pytest.raises(RecipeError, load_setup, recipe).value.problems
    assert "`tasks:` sequence" in problem and "add `grid.kind: regularisers`" in problem
    wrong = {**recipe, "grid": {"kind": "regularisers", "regularisers": [None, "ewc"]}}  # was a TypeError traceback
    assert pytest.raises(RecipeError, load_setup, wrong).value.problems == [
        "grid.regularisers[0]: expected str or dict, got None"]
    setup = load_setup({**recipe, "grid": {"kind": "regularisers", "regularisers": ["naive", "ewc"]}})
    assert setup.grid.kind == "regularisers" and [e.label for e in setup.regularisers] == ["naive", "ewc"]
    assert load_setup({**recipe, "grid": {"kind": "regularisers", "regularisers": ["naive"]}}).baseline == "naive"


@pytest.mark.parametrize(("resources", "grid", "expected"), [
    ({"CPU": 2.0}, {"cpus_per_cell": 64}, "grid.cpus_per_cell: 64 CPUs per cell, but the local Ray on this machine "
                                          "has 2; lower grid.cpus_per_cell"),
    ({"CPU": 8.0, "GPU": 1.0}, {"gpus_per_cell": 2}, "grid.gpus_per_cell: 2 GPUs per cell, but the local Ray"),
    ({"CPU": 2.0}, {"gpus_per_cell": 2}, None),  # no GPUs: cells ask for none (docs/grids.md)
    ({"CPU": 2.0}, {"cpus_per_cell": 2}, None),
])
def test_a_cell_larger_than_the_local_ray_is_refused_not_left_waiting(monkeypatch, color_recipe, resources, grid,
                                                                      expected):
    """A local Ray has this machine's CPUs and GPUs only: a task asking for more would never be scheduled (the grid
    or search hung at `running=1`); it is one clear error instead. A fake `ray` module: nothing starts."""
    import sys
    import types

    from mmpeft.grids.ray_executor import ray_session

    pytest.importorskip("ray", reason="Ray is not installed (pip install 'mmpeft[ray]')")
    recipe = {**{k: v for k, v in color_recipe.items() if k != "method"},
              "grid": {"methods": ["zero_shot"], "executor": "ray", **grid}}
    spec = load_setup(recipe).grid
    calls = []
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: calls.append("init"),
                                 cluster_resources=lambda: resources, shutdown=lambda: calls.append("shutdown"))
    monkeypatch.setitem(sys.modules, "ray", fake)
    if expected is None:
        with ray_session(spec):
            pass
    else:
        with pytest.raises(ValueError) as caught, ray_session(spec):
            pass
        assert expected in str(caught.value)
    assert calls == ["init", "shutdown"]  # the Ray it started is shut down either way


def test_processes_refuse_a_cell_larger_than_the_machine_instead_of_running_one_short_worker(monkeypatch,
                                                                                            color_recipe, tmp_path):
    """It used to start one worker with fewer CPUs than asked (the recipe said 8 per cell, the machine had 2)."""
    from mmpeft.grids.base import kind_of
    from mmpeft.grids.executors import ProcessExecutor

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    recipe = {**{k: v for k, v in color_recipe.items() if k != "method"},
              "grid": {"methods": ["zero_shot"], "executor": "processes", "cpus_per_cell": 8}}
    setup = load_setup(recipe)
    with pytest.raises(ValueError, match=r"grid.cpus_per_cell: 8 CPUs per cell, but this machine has 2; lower"):
        ProcessExecutor(setup.grid, kind_of(setup), tmp_path).slots(4)
    fitting = load_setup({**recipe, "grid": {**recipe["grid"], "cpus_per_cell": 1, "max_parallel": 3}})
    assert len(ProcessExecutor(fitting.grid, kind_of(fitting), tmp_path).slots(4)) == 2  # two 1-CPU slots on 2 CPUs


def test_a_worker_that_cannot_see_the_grid_folder_stops_the_grid_in_one_line(monkeypatch, color_folder,
                                                                             tiny_clip_dir, tmp_path, capsys):
    """The multi-node check (issue 15: a worker that cannot see the folder fails clearly), seen from a processes
    worker: the probe file it is given is not there, as on a node without the shared storage. A probe a killed
    driver left in the folder is removed when the next driver starts."""
    from mmpeft.cli import main
    from mmpeft.grids.executors import Executor

    recipe = executor_grid(color_folder, tiny_clip_dir, tmp_path, "processes")
    recipe["grid"].update(methods=["zero_shot"], seeds=[0], max_parallel=1)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    grid = tmp_path / "processes"
    grid.mkdir()
    (grid / ".probe-0123").write_text("a killed driver's")
    written = Executor.probe_file

    def unseen(self) -> Path:  # written, then gone: what a node without the shared storage sees
        path = written(self)
        path.unlink()
        return path

    monkeypatch.setattr(Executor, "probe_file", unseen)
    assert main(["compare", str(tmp_path / "recipe.yaml")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: grid folder {grid.resolve()} is not visible from a worker on ")
    assert "must be on storage every node mounts at the same path" in error
    assert not (grid / "cells").exists() and not (grid / ".probe-0123").exists()


def test_ctrl_c_on_a_processes_grid_is_one_message_not_a_traceback_per_worker(color_folder, tiny_clip_dir, tmp_path):
    """Ctrl+C in a terminal (and the UI's Stop, SIGINT to the launch's process group) reaches the pool workers too:
    each printed a KeyboardInterrupt traceback under the driver's `interrupted; continue with` line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = executor_grid(color_folder, tiny_clip_dir, tmp_path, "processes")
    recipe["grid"]["methods"], recipe["train"]["epochs"] = ["lora"], 200
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    driver = subprocess.Popen([sys.executable, "-m", "mmpeft", "compare", str(tmp_path / "recipe.yaml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "processes").glob("cells/*/checkpoints")) and time.time() < deadline:
            time.sleep(0.5)
        os.killpg(driver.pid, signal.SIGINT)
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted; continue with: mmpeft compare --resume" in err


def test_a_cell_whose_worker_dies_is_failed_and_the_others_finish(color_folder, tiny_clip_dir, tmp_path, monkeypatch):
    """Issue 15's 'a cell whose worker dies is recorded as failed with its error, the others go on' (it had no test):
    one pool worker is killed (-9) in its cell."""
    import threading
    import time

    from mmpeft.grids import executors

    workers, started = [], executors.Worker.__init__

    def kept(self, *args, **kwargs):
        started(self, *args, **kwargs)
        workers.append(self)

    monkeypatch.setattr(executors.Worker, "__init__", kept)
    recipe = executor_grid(color_folder, tiny_clip_dir, tmp_path, "processes")
    recipe["grid"]["methods"], recipe["train"]["epochs"] = ["lora"], 20
    result = {}
    driver = threading.Thread(target=lambda: result.update(mmpeft.compare(recipe)))
    driver.start()
    deadline = time.time() + 120
    while not any(w.cell is not None and (w.cell.dir / "train.log").is_file() for w in workers):
        assert time.time() < deadline and driver.is_alive(), "no cell started"
        time.sleep(0.2)
    victim = next(w for w in workers if w.cell is not None)
    cell = victim.cell.name
    victim.process.kill()
    driver.join(timeout=120)
    rows = {r["cell"]: r for r in result["rows"]}
    assert rows.pop(cell)["error"] == "WorkerDied: the worker process running this cell exited with code -9"
    assert [r["status"] for r in rows.values()] == ["ok"]
    assert "WorkerDied" in (tmp_path / "processes" / "cells" / cell / "error.txt").read_text()


def test_ray_without_the_package_is_a_recipe_error_saying_how_to_install_it(monkeypatch, color_recipe):
    """Issue 15 item 1 (it had no test): grid.executor: ray where Ray is not installed."""
    from mmpeft.grids import loading

    find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None if name == "ray" else find_spec(name))
    recipe = {**{k: v for k, v in color_recipe.items() if k != "method"},
              "grid": {"methods": ["zero_shot"], "executor": "ray"}}
    assert pytest.raises(RecipeError, load_setup, recipe).value.problems == [
        "grid.executor: ray needs the Ray package, which is not installed: pip install 'mmpeft[ray]'"]


def test_a_ray_address_with_no_cluster_there_is_one_line(monkeypatch, color_recipe):
    """`grid.ray_address: auto` (or host:port) where no Ray cluster runs ended in Ray's ConnectionError traceback."""
    import sys
    import types

    from mmpeft.grids.ray_executor import ray_session

    pytest.importorskip("ray", reason="Ray is not installed (pip install 'mmpeft[ray]')")

    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    recipe = {**{k: v for k, v in color_recipe.items() if k != "method"},
              "grid": {"methods": ["zero_shot"], "executor": "ray", "ray_address": "auto"}}
    spec = load_setup(recipe).grid
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False, init=refuse))
    with pytest.raises(ValueError) as caught, ray_session(spec):
        pass
    assert str(caught.value).startswith("grid.ray_address: 'auto': Could not find any running Ray instance. Start "
                                        "the cluster first (`ray start --head` on its head node), or leave")


def test_a_resume_whose_executor_cannot_start_leaves_the_grid_recipe_as_it_was(monkeypatch, color_folder,
                                                                               tiny_clip_dir, tmp_path):
    """`mmpeft compare --resume GRID grid.executor=ray grid.ray_address=auto` with no cluster saved those settings in
    compare.yaml before failing, so every later plain `--resume GRID` failed the same way."""
    import importlib.machinery
    import sys
    import types

    from mmpeft.cli import main

    pytest.importorskip("ray", reason="Ray is not installed (pip install 'mmpeft[ray]')")
    recipe = executor_grid(color_folder, tiny_clip_dir, tmp_path, "sequential")
    recipe["grid"].update(methods=["zero_shot"], seeds=[0])
    mmpeft.compare(recipe)
    grid = tmp_path / "sequential"
    saved = (grid / "compare.yaml").read_text()

    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(
        is_initialized=lambda: False, init=refuse, __spec__=importlib.machinery.ModuleSpec("ray", None)))
    assert main(["compare", "--resume", str(grid), "grid.executor=ray", "grid.ray_address=auto"]) == 2
    assert (grid / "compare.yaml").read_text() == saved
