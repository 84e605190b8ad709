"""`mmpeft search` with `grid.executor: ray`: Ray Tune's ASHA scheduler instead of Optuna (pip install 'mmpeft[ray]').

The same space, trials and outputs as mmpeft.grids.search, with Ray's own machinery: a seeded BasicVariantGenerator
draws the settings (every method's keys are drawn, the trial uses its method's), `ASHAScheduler(time_attr="epoch",
grace_period=min_epochs, reduction_factor, max_t=train.epochs)` stops trials at rungs, each trial is a Ray Tune
function trial (grid.cpus_per_cell CPUs, grid.gpus_per_cell GPUs where the cluster has them; grid.max_parallel at
once) that runs an ordinary validation-only run folder and reports every epoch through a training callback. Ray's
experiment folder is <grid>/search/ray; `--resume` restores it (unfinished trials continue; its trial count is
fixed). Differences from the Optuna path: a stopped trial's actor is ended at once, so its folder keeps its log and
checkpoint but no metrics.json; the budget is a Tune stopper (the search stops when less than min_epochs epochs
are left; trials running in parallel may overrun it by their current epoch), gpu_hours is Tune's time_budget_s;
several trials at once make the rungs' decisions depend on timing.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from mmpeft.core.io import write_json
from mmpeft.grids.ray_executor import cell_gpus, ray_session
from mmpeft.grids.search_space import SearchSetup, trial_recipe, val_score
from mmpeft.train import Callback

logger = logging.getLogger("mmpeft")

RAY_DIR = "ray"
SETTINGS_FILE = "ray_settings.json"  # what the trials depend on: a resumed search must keep it
PRUNED_FILE = "ray_pruned.jsonl"  # trials the scheduler stopped at a rung (the others stopped short: the budget)


class EpochBudget(tune.Stopper):
    """Ends the search once fewer than min_epochs epochs of search.budget.epochs are left."""

    def __init__(self, epochs: int | None, min_epochs: int):
        self.epochs, self.min_epochs, self.seen = epochs, min_epochs, {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seen[trial_id] = result.get("epoch", 0)
        return False

    def stop_all(self) -> bool:
        return self.epochs is not None and self.epochs - sum(self.seen.values()) < self.min_epochs


class RecordingASHA(ASHAScheduler):
    """ASHA that writes down which trials it stopped at a rung, so the leaderboard can tell pruned from stopped."""

    def __init__(self, record: str, **kwargs):
        super().__init__(**kwargs)
        self.record, self.last_epoch = record, kwargs["max_t"]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get("epoch", 0) < self.last_epoch:
            with open(self.record, "a") as handle:
                handle.write(json.dumps(trial.trial_id) + "\n")
        return decision


class TuneReporter(Callback):
    """Every epoch's validation score (and the trial's cost so far) to Ray Tune, which may stop the trial there."""

    def __init__(self, metric: str, folder: str):
        self.metric, self.folder, self.tic, self.trainable = metric, folder, time.perf_counter(), None
        self.last: dict | None = None

    def on_train_start(self, trainer) -> None:
        from mmpeft.methods import count_parameters

        self.trainable = count_parameters(trainer.backbone)["trainable"]

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        self.last = {"epoch": metrics["epoch"], self.metric: val_score(metrics, self.metric),
                     "trainable_params": self.trainable,
                     "train_seconds": round(trainer.progress.train_seconds, 3),
                     "seconds": round(time.perf_counter() - self.tic, 3), "dir": self.folder}
        if metrics["epoch"] < trainer.spec.epochs:  # the last epoch is reported once the run folder is complete:
            tune.report(self.last)                  # at max_t the scheduler ends the trial's actor at once


def trial_number(trial_id: str) -> int:
    """Ray's trial ids end in the trial's index (`1a2b3_00004` -> 4)."""
    return int(trial_id.rsplit("_", 1)[-1])


def ray_trial(config: dict, setup: SearchSetup, folder: str) -> None:
    """One trial in a Ray worker: the trial's run folder, reported epoch by epoch."""
    import torch

    torch.set_num_threads(setup.compare.grid.threads_per_cell)
    from mmpeft.runs.single import run

    entry = {e.label: e for e in setup.entries}[config["method"]]
    values = {p.key: config[p.name] for p in entry.params}
    name = f"{trial_number(tune.get_context().get_trial_id()):03d}-{entry.label}"
    reporter = TuneReporter(setup.spec.metric, f"trials/{name}")
    run(trial_recipe(setup, entry, values, Path(folder), name), callbacks=(reporter,))
    if reporter.last is not None and reporter.last["epoch"] >= setup.compare.recipe.train.epochs:
        tune.report({**reporter.last, "seconds": round(time.perf_counter() - reporter.tic, 3)})


def space(setup: SearchSetup) -> dict:
    """The search space as Ray Tune distributions: `method`, then every method's keys."""
    found: dict = {"method": tune.choice([e.label for e in setup.entries])}
    for entry in setup.entries:
        for p in entry.params:
            if p.choices is not None:
                found[p.name] = tune.choice(list(p.choices))
            elif p.integer():
                found[p.name] = (tune.lograndint(p.low, p.high + 1) if p.log else
                                 tune.qrandint(p.low, p.high, p.step) if p.step else tune.randint(p.low, p.high + 1))
            else:
                found[p.name] = (tune.loguniform(p.low, p.high) if p.log else
                                 tune.quniform(p.low, p.high, p.step) if p.step else tune.uniform(p.low, p.high))
    return found


def make_tuner(setup: SearchSetup, grid_dir: Path, trainable):
    """A new Tuner, or the one in <grid>/search/ray restored (`--resume`)."""
    from ray.tune.search import BasicVariantGenerator

    spec, grid, epochs = setup.spec, setup.compare.grid, setup.compare.recipe.train.epochs
    path, settings = grid_dir / "search" / RAY_DIR, grid_dir / "search" / SETTINGS_FILE
    if tune.Tuner.can_restore(str(path)):  # Ray keeps its trial count, budget and space: only search.top may change
        setup.refuse_changes(json.loads(settings.read_text()) if settings.is_file() else {}, grid_dir, ("top",))
        logger.info("search: continuing Ray Tune's experiment in %s", path)
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False)
    write_json(settings, setup.settings(("top",)))
    scheduler = RecordingASHA(str(grid_dir / "search" / PRUNED_FILE), time_attr="epoch", max_t=epochs,
                              grace_period=spec.min_epochs, reduction_factor=spec.reduction_factor)
    config = tune.TuneConfig(metric=spec.metric, mode="max", num_samples=spec.trials, scheduler=scheduler,
                             reuse_actors=True,  # one worker process after another: torch is imported once
                             search_alg=BasicVariantGenerator(random_state=setup.seed,
                                                              max_concurrent=grid.max_parallel or 0),
                             time_budget_s=spec.budget.gpu_hours * 3600 if spec.budget.gpu_hours else None)
    run = tune.RunConfig(storage_path=str(path.parent), name=RAY_DIR, verbose=0,
                         stop=EpochBudget(spec.budget.epochs, spec.min_epochs))
    return tune.Tuner(trainable, param_space=space(setup), tune_config=config, run_config=run)


def ray_trials(setup: SearchSetup, grid_dir: Path) -> list[dict]:
    """Run (or continue) the trials on Ray; one record per trial that ran, as mmpeft.grids.search.study_records."""
    import ray

    grid_dir, grid = grid_dir.resolve(), setup.compare.grid
    with ray_session(grid):
        trainable = tune.with_resources(tune.with_parameters(ray_trial, setup=setup, folder=str(grid_dir / "trials")),
                                        {"cpu": grid.cpus_per_cell, "gpu": cell_gpus(ray, grid)})
        results = make_tuner(setup, grid_dir, trainable).fit()
        return records(setup, results, grid_dir)


def records(setup: SearchSetup, results, grid_dir: Path) -> list[dict]:
    metric, epochs = setup.spec.metric, setup.compare.recipe.train.epochs
    record = grid_dir / "search" / PRUNED_FILE
    pruned = {json.loads(line) for line in record.read_text().splitlines()} if record.is_file() else set()
    found = []
    for result in results:
        last = result.metrics or {}
        frame = result.metrics_dataframe
        steps = [float(v) for v in frame[metric]] if frame is not None and metric in frame else []
        if "trial_id" not in last:  # failed before its first epoch: the id is in its folder's name
            found_id = re.search(r"_([0-9a-f]+_\d{5})_", Path(result.path).name)
            last = {**last, "trial_id": found_id.group(1) if found_id else "_0"}
        if not steps and result.error is None:
            continue  # never started (the budget ran out first)
        label, ran = result.config["method"], int(last.get("epoch", 0))
        entry = {e.label: e for e in setup.entries}[label]
        state = ("failed" if result.error is not None else "complete" if ran >= epochs else
                 "pruned" if last["trial_id"] in pruned else "stopped")
        found.append({"trial": trial_number(last["trial_id"]), "method": label, "state": state, "steps": steps,
                      "values": {p.key: result.config[p.name] for p in entry.params}, "epochs": ran,
                      "seconds": last.get("seconds", 0.0), "final": steps[-1] if steps else None,
                      "trainable_params": last.get("trainable_params"), "train_seconds": last.get("train_seconds"),
                      "dir": last.get("dir"), "error": str(result.error).splitlines()[0] if result.error else None})
    return sorted(found, key=lambda r: r["trial"])
