"""Experiment trackers for real, offline: MLflow with a local file store read back through `mlflow.search_runs`, and
W&B in offline mode, its run folder checked; both from one tiny run, and grid cells as one experiment."""

from __future__ import annotations

import importlib.util
import json

import pytest

import mmpeft
from mmpeft.core.schema import RecipeError

HAS_TRACKERS = all(importlib.util.find_spec(m) for m in ("mlflow", "wandb"))


def test_log_with_takes_one_tracker_or_a_list_and_says_how_to_install_a_missing_one():
    if HAS_TRACKERS:
        assert mmpeft.load_recipe({"method": "lora", "train": {"log_with": "mlflow"}}).train.log_with == ("mlflow",)
    with pytest.raises(RecipeError, match=r"train.log_with\[1\]: 'neptune' is not one of 'tensorboard', 'mlflow'"):
        mmpeft.load_recipe({"method": "lora", "train": {"log_with": ["mlflow", "neptune"]}})
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(RecipeError, match=r"log_with: tensorboard is not installed; `pip install tensorboard`"):
            mmpeft.load_recipe({"method": "lora", "train": {"log_with": ["tensorboard"]}})
    if HAS_TRACKERS:
        recipe = mmpeft.load_recipe({"method": "lora", "train": {"log_with": ["mlflow", "wandb", "mlflow"]}})
        assert recipe.train.log_with == ("mlflow", "wandb", "mlflow")  # trackers_of() keeps each once
        from mmpeft.train.tracking import trackers_of

        assert trackers_of(recipe.train) == ("mlflow", "wandb")


def test_a_tracker_that_is_not_installed_is_a_recipe_error_saying_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mlflow", "wandb")
                        else find_spec(name, *a))  # as on a machine without the extras
    with pytest.raises(RecipeError) as error:
        mmpeft.load_recipe({"method": "lora", "train": {"log_with": ["mlflow", "wandb"]}})
    assert "train.log_with: mlflow is not installed; `pip install 'mmpeft[mlflow]'`" in str(error.value)
    assert "train.log_with: wandb is not installed; `pip install 'mmpeft[wandb]'`" in str(error.value)


@pytest.mark.skipif(not HAS_TRACKERS, reason="needs mlflow and wandb (pip install 'mmpeft[mlflow,wandb]')")
def test_a_wandb_project_name_wandb_refuses_is_a_recipe_error():
    """Was a failed start after the run folder was made ("did not start: UsageError", hinting WANDB_MODE=offline)."""
    with pytest.raises(RecipeError, match=r"train.tracking_experiment: 'team/exp 1' is the W&B project name, which "
                                          r"contains '/'"):
        mmpeft.load_recipe({"method": "lora", "train": {"log_with": "wandb", "tracking_experiment": "team/exp 1"}})
    with pytest.raises(RecipeError, match=r"tracking_experiment \(default: name\): 'v2:a' .* contains ':'"):
        mmpeft.load_recipe({"name": "v2:a", "method": "lora", "train": {"log_with": ["mlflow", "wandb"]}})
    with pytest.raises(RecipeError, match="is 129 characters long"):
        mmpeft.load_recipe({"method": "lora", "train": {"log_with": "wandb", "tracking_experiment": "x" * 129}})
    mmpeft.load_recipe({"name": "v2:a", "method": "lora", "train": {"log_with": "mlflow"}})  # MLflow takes it


@pytest.mark.parametrize("uri, fragment", [
    ("{file}", "{file} is a file, but MLflow's local store is a folder"),
    ("{file}/mlruns", "{file} is a file, but MLflow's local store is a folder"),
    ("file://{file}", "{file} is a file"),
    ("", "train.tracking_uri: empty"),  # was: the current folder silently became the store
])
def test_an_mlflow_store_that_cannot_be_a_folder_is_a_recipe_error(uri, fragment, tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    fill = {"file": str(tmp_path / "notes.txt")}
    with pytest.raises(RecipeError) as error:
        mmpeft.load_recipe({"method": "lora", "train": {"log_with": "mlflow", "tracking_uri": uri.format(**fill)}})
    assert fragment.format(**fill) in str(error.value)
    for fine in ("./mlruns", str(tmp_path / "new" / "mlruns"), "sqlite:///mlflow.db", "http://localhost:5000"):
        mmpeft.load_recipe({"method": "lora", "train": {"log_with": "mlflow", "tracking_uri": fine}})


def test_a_tracker_that_does_not_start_names_the_fix_for_that_tracker_only(tmp_path):
    from mmpeft.specs import TrainSpec
    from mmpeft.train.tracking import TrackingError, start_tracking

    class NoLogin:  # what accelerate passes on from wandb.init without an API key and without WANDB_MODE=offline
        def init_trackers(self, *args, **kwargs):
            raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    with pytest.raises(TrackingError) as error:
        start_tracking(NoLogin(), TrainSpec(log_with=("wandb",)), tmp_path, {})
    assert str(error.value) == ("train.log_with: wandb did not start: RuntimeError: No API key configured. Use `wandb "
                                "login` to log in. W&B without an account or network: set WANDB_MODE=offline")


@pytest.mark.skipif(not HAS_TRACKERS, reason="needs mlflow and wandb (pip install 'mmpeft[mlflow,wandb]')")
def test_mlflow_and_wandb_offline_hold_the_recipe_metrics_and_artifacts(color_recipe, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = tmp_path / "mlruns"
    recipe = {**color_recipe, "train": {**color_recipe["train"], "epochs": 2, "log_with": ["mlflow", "wandb"],
                                        "tracking_uri": str(store), "tracking_experiment": "grid-colors"}}
    cells = [mmpeft.run({**recipe, "output": {**recipe["output"], "name": "cell-0"}})]
    second = {**recipe["train"], "epochs": 1, "log_with": "mlflow"}  # another cell of the grid: same experiment
    cells.append(mmpeft.run({**recipe, "seed": 1, "train": second, "output": {**recipe["output"], "name": "cell-1"}}))
    mlflow.set_tracking_uri(store.resolve().as_uri())
    runs = mlflow.search_runs(experiment_names=["grid-colors"], order_by=["attributes.start_time"])
    assert list(runs["tags.mlflow.runName"]) == ["cell-0", "cell-1"] and set(runs["status"]) == {"FINISHED"}
    first, metrics = runs.iloc[0], cells[0]
    assert first["params.method.name"] == "lora" and first["params.train.epochs"] == "2"
    assert first["metrics.test/accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert first["metrics.val/accuracy"] == pytest.approx(metrics["train"]["history"][-1]["val_accuracy"])
    client = MlflowClient()
    losses = client.get_metric_history(first["run_id"], "train/loss")
    assert len(losses) == metrics["train"]["steps"] and losses[0].step == 1
    assert len(client.get_metric_history(first["run_id"], "val/accuracy")) == 2  # one per epoch
    artifacts = {item.path for item in client.list_artifacts(first["run_id"])}
    assert {"report.md", "metrics.json", "recipe.yaml"} <= artifacts and any(a.endswith(".png") for a in artifacts)

    run_dir = tmp_path / "runs" / "cell-0"
    (offline,) = (run_dir / "tracking" / "wandb").glob("offline-run-*")
    files = offline / "files"
    assert {"report.md", "metrics.json"} <= {p.name for p in files.iterdir()}
    assert json.loads((files / "metrics.json").read_text())["test"] == metrics["test"]
    records = wandb_records(next(offline.glob("*.wandb")))
    (run,) = records["run"]
    assert (run.display_name, run.project, run.run_group) == ("cell-0", "grid-colors", "grid-colors")
    config = {item.key: item.value_json for record in (run.config, *records.get("config", ()))
              for item in record.update}
    assert json.loads(config["method.name"]) == "lora" and json.loads(config["train.epochs"]) == 2
    history = [{item.key or "/".join(item.nested_key): item.value_json for item in record.item}
               for record in records["history"]]
    assert sum("train/loss" in row for row in history) == metrics["train"]["steps"]
    final = [row for row in history if "test/accuracy" in row]
    assert len(final) == 1 and json.loads(final[0]["test/accuracy"]) == pytest.approx(metrics["test"]["accuracy"])



@pytest.mark.skipif(not HAS_TRACKERS, reason="needs mlflow and wandb (pip install 'mmpeft[mlflow,wandb]')")
def test_the_cells_of_a_real_grid_are_runs_of_one_experiment_named_after_it(color_recipe, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = tmp_path / "mlruns"
    train = {**color_recipe["train"], "epochs": 1, "log_with": ["mlflow", "wandb"], "tracking_uri": str(store)}
    grid = {**{k: v for k, v in color_recipe.items() if k != "method"}, "name": "colors-grid", "train": train,
            "grid": {"methods": ["lora", "bitfit"], "seeds": [0]}, "output": {"dir": str(tmp_path / "runs")}}
    mmpeft.compare(grid)
    mlflow.set_tracking_uri(store.resolve().as_uri())
    runs = mlflow.search_runs(experiment_names=["colors-grid"])
    assert sorted(runs["tags.mlflow.runName"]) == ["bitfit-seed0", "lora-seed0"]
    offline_runs = sorted((tmp_path / "runs").glob("colors-grid-*/cells/*/tracking/wandb/offline-run-*"))
    assert len(offline_runs) == 2
    for offline in offline_runs:
        (run,) = wandb_records(next(offline.glob("*.wandb")))["run"]
        assert (run.project, run.run_group) == ("colors-grid", "colors-grid")


@pytest.mark.skipif(not HAS_TRACKERS, reason="needs mlflow and wandb (pip install 'mmpeft[mlflow,wandb]')")
def test_a_run_that_fails_in_training_is_marked_failed(color_recipe, tmp_path, monkeypatch):
    import mlflow

    from mmpeft.train import TrainingDiverged

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = tmp_path / "mlruns"
    train = {**color_recipe["train"], "epochs": 1, "lr": 1e30, "log_with": ["mlflow", "wandb"],
             "tracking_uri": str(store)}
    with pytest.raises(TrainingDiverged):
        mmpeft.run({**color_recipe, "train": train, "eval": {"zero_shot": False}})
    mlflow.set_tracking_uri(store.resolve().as_uri())
    (status,) = mlflow.search_runs(experiment_names=["colors"])["status"]
    assert status == "FAILED"
    (offline,) = (tmp_path / "runs" / "run" / "tracking" / "wandb").glob("offline-run-*")
    (exit_record,) = wandb_records(next(offline.glob("*.wandb")))["exit"]
    assert exit_record.exit_code == 1


@pytest.mark.skipif(not HAS_TRACKERS, reason="needs mlflow and wandb (pip install 'mmpeft[mlflow,wandb]')")
def test_a_resumed_run_continues_its_tracker_runs(color_recipe, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from mmpeft.train import Callback, Trainer

    class Interrupt(Callback):  # a kill after 5 batches, once a mid-epoch checkpoint exists
        left = 5

        def transform_batch(self, batch):
            Interrupt.left -= 1
            if Interrupt.left < 0:
                raise KeyboardInterrupt
            return batch

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = tmp_path / "mlruns"
    train = {**color_recipe["train"], "epochs": 2, "checkpoint_every_steps": 2, "log_with": ["mlflow", "wandb"],
             "tracking_uri": str(store)}
    recipe = {**color_recipe, "train": train, "eval": {"zero_shot": False}}
    original_init = Trainer.__init__

    def interrupted_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.callbacks = (Interrupt(),)

    monkeypatch.setattr(Trainer, "__init__", interrupted_init)
    with pytest.raises(KeyboardInterrupt):
        mmpeft.run(recipe)
    monkeypatch.setattr(Trainer, "__init__", original_init)
    run_dir = tmp_path / "runs" / "run"
    ids = json.loads((run_dir / "tracking" / "runs.json").read_text())
    metrics = mmpeft.run(None, resume=run_dir)

    mlflow.set_tracking_uri(store.resolve().as_uri())
    runs = mlflow.search_runs(experiment_names=["colors"])
    assert list(runs["run_id"]) == [ids["mlflow"]] and list(runs["status"]) == ["FINISHED"]  # one run, continued
    steps = {m.step for m in MlflowClient().get_metric_history(ids["mlflow"], "train/loss")}
    assert steps == set(range(1, metrics["train"]["steps"] + 1))  # before and after the interruption
    assert runs.iloc[0]["metrics.test/accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    offline = sorted((run_dir / "tracking" / "wandb").glob("offline-run-*"))
    # offline-run-<second>-<id>[-n]: one folder per start (W&B adds -1 when both start within one second), one run id
    assert offline and all(f"-{ids['wandb']}" in path.name for path in offline)
    assert json.loads((run_dir / "tracking" / "runs.json").read_text()) == ids


def wandb_records(path) -> dict[str, list]:
    """The records of an offline W&B run file (LevelDB-log framing: 32 KiB blocks of 7-byte-headed chunks after a
    7-byte file header), parsed with wandb's own protobuf classes, by record type."""
    from wandb.proto import wandb_internal_pb2

    data, found, block, position, pending = path.read_bytes(), {}, 32768, 7, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            kind_name = record.WhichOneof("record_type")
            found.setdefault(kind_name, []).append(getattr(record, kind_name))
            pending = b""
        elif kind == 0:
            break
    return found
