"""`mmpeft search`: successive halving over methods and their settings (Optuna), then the best re-run as a grid.

<grid>/search.yaml            the resolved search recipe (`mmpeft search --resume <grid>` reloads it)
<grid>/search/study.log       Optuna's embedded journal storage: every trial, its drawn settings and epoch scores
<grid>/trials/<n>-<method>/   an ordinary run folder per trial, validation only (eval.test: false)
<grid>/search/leaderboard.*   every trial (csv, md);  pareto.png: val score against parameters and training time
<grid>/cells/, results.*, summary.md, report.md, compare.yaml: the `search.top` best complete trials re-run over
                              grid.seeds as an ordinary methods grid (mmpeft.grids.runner.run_grid), tested once

Trials run one after another in this process with a seeded TPE sampler (re-seeded per trial number, so a resumed
search draws what an uninterrupted one would), reporting each epoch's validation score to Optuna's
SuccessiveHalvingPruner through a training callback; a pruned trial stops at its rung and keeps its folder. The
budget counts the epochs (and wall-clock seconds) every trial ran, pruned and failed ones included; no trial starts
with less than `min_epochs` left, and a running one stops when it is spent. A trial left running by a killed driver
is marked failed when the search resumes, its epochs counted. With `grid.executor: ray` the trials run under Ray
Tune's ASHA scheduler instead (mmpeft.grids.search_ray); the rest is the same.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from mmpeft.core.io import write_json, write_text
from mmpeft.core.schema import RecipeError, to_plain
from mmpeft.grids.base import resolved_yaml
from mmpeft.grids.runner import claimed
from mmpeft.grids.search_space import (
    MISSING_OPTUNA,
    SearchEntry,
    SearchSetup,
    load_search_setup,
    trial_recipe,
    val_score,
)
from mmpeft.runs.folder import log_to
from mmpeft.train import Callback

logger = logging.getLogger("mmpeft")

SEARCH_RECIPE = "search.yaml"
SEARCH_DIR = "search"
STUDY_FILE = "study.log"
CHANGEABLE = ("trials", "budget", "top")  # search keys a resumed search may change


def import_optuna():
    """Optuna, imported when a search runs; its absence is one clear line."""
    try:
        import optuna
    except ImportError:
        raise RecipeError([MISSING_OPTUNA]) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def search(recipe: str | Path | dict | None, overrides: list[str] | dict | None = None,
           resume: str | Path | None = None) -> dict:
    """Run (or continue, `resume` = a grid folder) a search recipe; returns trials, chosen labels, budget and grid."""
    if resume is not None:
        grid_dir = Path(resume)
        if not (grid_dir / SEARCH_RECIPE).is_file():
            raise FileNotFoundError(f"--resume {grid_dir}: no {SEARCH_RECIPE} there; is it a search folder?")
        setup = load_search_setup(grid_dir / SEARCH_RECIPE, overrides)
    else:
        setup = load_search_setup(recipe, overrides)
        shared = setup.compare.recipe
        grid_dir = Path(shared.output.dir) / (shared.output.name or f"{shared.name}-{datetime.now():%Y%m%d-%H%M%S}")
    if setup.compare.grid.executor != "ray":
        import_optuna()
    check_scheduler(setup, grid_dir)
    (grid_dir / SEARCH_DIR).mkdir(parents=True, exist_ok=True)
    with claimed(grid_dir, "search"), log_to(grid_dir / "search.log"):
        if not (grid_dir / SEARCH_RECIPE).is_file():  # at once: a search killed while starting can be resumed
            write_text(grid_dir / SEARCH_RECIPE, resolved_yaml(setup.resolved(), "search", grid_dir, "search space"))
        try:
            return run_search(setup, grid_dir)
        except KeyboardInterrupt:
            logger.warning("interrupted; continue with: mmpeft search --resume %s", grid_dir)
            raise


def check_scheduler(setup: SearchSetup, grid_dir: Path) -> None:
    """Trials run by Optuna (search/study.log) continue only under Optuna, Ray Tune's (search/ray/) only under Ray:
    the other would start the search again from no trials, over the folders of the first."""
    ray = setup.compare.grid.executor == "ray"
    other = grid_dir / SEARCH_DIR / (STUDY_FILE if ray else "ray")  # "ray": mmpeft.grids.search_ray.RAY_DIR
    if other.exists():
        ran, executor = ("by Optuna", "sequential or processes") if ray else ("on Ray Tune", "ray")
        raise RecipeError([f"search {grid_dir}: its trials were run {ran} ({other}), and grid.executor: "
                           f"{setup.compare.grid.executor} would start them again from none",
                           f"continue it with grid.executor: {executor} (the chosen configurations' grid may then run "
                           "under any executor: mmpeft compare --resume), or use another output.name"])


def run_search(setup: SearchSetup, grid_dir: Path) -> dict:
    """Trials until the trial count or the budget runs out, the leaderboard, then the chosen ones as a grid."""
    from mmpeft.grids.loading import load_setup
    from mmpeft.grids.runner import run_grid

    if setup.compare.grid.executor == "ray":  # Ray Tune's ASHA scheduler instead of Optuna
        from mmpeft.grids.search_ray import ray_trials

        write_text(grid_dir / SEARCH_RECIPE, resolved_yaml(setup.resolved(), "search", grid_dir, "search space"))
        records = ray_trials(setup, grid_dir)
    else:
        study = open_study(setup, grid_dir)
        write_text(grid_dir / SEARCH_RECIPE, resolved_yaml(setup.resolved(), "search", grid_dir, "search space"))
        run_trials(setup, study, grid_dir)
        records = study_records(study.get_trials(deepcopy=False))
    rows = leaderboard(setup, records, grid_dir)
    chosen = chosen_entries(setup, records)
    if 0 < len(chosen) < setup.spec.top:
        logger.warning("search: only %d complete trials for search.top %d", len(chosen), setup.spec.top)
    used = (sum(r["epochs"] for r in records), sum(r["seconds"] for r in records))
    summary = {"trials": len(records), "states": _states(rows), "budget": {"given": to_plain(setup.spec.budget),
               "used": {"epochs": used[0], "gpu_hours": round(used[1] / 3600, 4)}},
               "metric": setup.spec.metric, "chosen": [e["label"] for e in chosen]}
    write_json(grid_dir / SEARCH_DIR / "summary.json", summary)
    if not chosen:
        key = "epochs" if setup.spec.budget.epochs is not None else "gpu_hours"  # the one given (or both: epochs)
        raise ValueError(f"search: no trial completed train.epochs ({setup.compare.recipe.train.epochs}) within the "
                         f"budget; raise search.budget or search.trials (mmpeft search --resume {grid_dir} "
                         f"search.budget.{key}=...); every trial is in {grid_dir / SEARCH_DIR / 'leaderboard.md'}")
    data = setup.compare.recipe.to_dict()
    data.pop("method")
    grid = {k: v for k, v in to_plain(setup.compare.grid).items() if k != "methods"}
    data["output"] = {"dir": str(grid_dir.parent), "name": grid_dir.name}
    final = load_setup({**data, "grid": {**grid, "methods": chosen}}, None, "search")  # compare.yaml: `mmpeft search`
    result = run_grid(final, grid_dir)
    append_report(grid_dir, setup, summary, chosen)
    return {"dir": str(grid_dir), "trials": rows, "chosen": summary["chosen"], "budget": summary["budget"],
            "grid": result}


def open_study(setup: SearchSetup, grid_dir: Path):
    """The study in <grid>/search/study.log (made, or continued when its settings match); trials a killed driver
    left running are marked failed."""
    optuna = import_optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    spec = setup.spec
    storage = JournalStorage(JournalFileBackend(str(grid_dir / SEARCH_DIR / STUDY_FILE)))
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.min_epochs,
                                                    reduction_factor=spec.reduction_factor, min_early_stopping_rate=0)
    study = optuna.create_study(storage=storage, sampler=sampler(setup, 0), pruner=pruner, study_name="search",
                                direction="maximize", load_if_exists=True)
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", setup.settings(CHANGEABLE))
    else:
        setup.refuse_changes(saved, grid_dir, CHANGEABLE)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        logger.warning("trial %d was left running (its driver stopped): marked failed, its %d epochs counted",
                       trial.number, trial.user_attrs.get("epochs", 0))
        study.tell(trial.number, state=TrialState.FAIL)
    return study


def sampler(setup: SearchSetup, number: int):
    """TPE seeded by (sampler seed, trial number): trial n draws the same whether or not the search was resumed."""
    from optuna.samplers import TPESampler

    return TPESampler(seed=(setup.seed + number) % 2**32)


def budget_used(trials) -> tuple[int, float]:
    """(epochs, wall seconds) every trial ran so far, whatever its state."""
    return (sum(t.user_attrs.get("epochs", 0) for t in trials),
            sum(t.user_attrs.get("seconds", 0.0) for t in trials))


def budget_left(setup: SearchSetup, trials) -> tuple[float, float]:
    """(epochs, seconds) left; infinite where the budget does not limit that."""
    budget, (epochs, seconds) = setup.spec.budget, budget_used(trials)
    return (float("inf") if budget.epochs is None else budget.epochs - epochs,
            float("inf") if budget.gpu_hours is None else budget.gpu_hours * 3600 - seconds)


def run_trials(setup: SearchSetup, study, grid_dir: Path) -> None:
    """Start trials until search.trials have started or the budget is spent, one at a time."""
    from tqdm.auto import tqdm

    spec = setup.spec
    trials = study.get_trials(deepcopy=False)
    bar = tqdm(total=spec.trials, initial=min(len(trials), spec.trials), unit="trial", file=sys.stderr,
               dynamic_ncols=True, leave=False)
    try:
        while True:
            trials = study.get_trials(deepcopy=False)
            epochs_left, seconds_left = budget_left(setup, trials)
            bar.set_postfix(**_states(leaderboard_states(trials)), budget=_budget_text(setup, trials))
            if len(trials) >= spec.trials or epochs_left < spec.min_epochs or seconds_left <= 0:
                why = "trials" if len(trials) >= spec.trials else "budget"
                logger.info("search: %d trials; stopped by search.%s (%s)", len(trials), why,
                            _budget_text(setup, trials))
                return
            study.sampler = sampler(setup, len(trials))
            line = run_trial(setup, study, grid_dir, epochs_left, seconds_left)
            bar.update(1)
            bar.write(line, file=sys.stdout)
            sys.stdout.flush()
    finally:
        bar.close()


class TrialReporter(Callback):
    """Each epoch's validation score to the Optuna trial; stops the run at a rung it does not pass, or at the budget."""

    def __init__(self, trial, metric: str, epochs_left: float, seconds_left: float):
        self.trial, self.metric, self.epochs_left, self.seconds_left = trial, metric, epochs_left, seconds_left
        self.stopped: str | None = None  # halving | budget
        self.tic = time.perf_counter()

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        epoch, seconds = metrics["epoch"], time.perf_counter() - self.tic
        self.trial.report(val_score(metrics, self.metric), epoch)
        self.trial.set_user_attr("epochs", epoch)
        self.trial.set_user_attr("seconds", round(seconds, 3))
        if epoch >= trainer.spec.epochs:
            return
        if self.trial.should_prune():
            self.stopped = "halving"
        elif epoch >= self.epochs_left or seconds >= self.seconds_left:
            self.stopped = "budget"
        if self.stopped:
            trainer.progress.finished = True  # the run ends as after early stopping: validated, saved, no test


def run_trial(setup: SearchSetup, study, grid_dir: Path, epochs_left: float, seconds_left: float) -> str:
    """Ask for a trial, run it as an ordinary run folder (validation only) and tell Optuna how it ended."""
    from optuna.trial import TrialState

    from mmpeft.grids.cells import error_message
    from mmpeft.runs.single import run

    trial = study.ask()
    entry, values = draw(setup, trial)
    name = f"{trial.number:03d}-{entry.label}"
    trial.set_user_attr("dir", f"trials/{name}")
    reporter = TrialReporter(trial, setup.spec.metric, epochs_left, seconds_left)
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    try:
        metrics = run(trial_recipe(setup, entry, values, grid_dir / "trials", name), callbacks=(reporter,))
    except Exception as error:  # the search goes on; the leaderboard keeps the error
        trial.set_user_attr("seconds", round(time.perf_counter() - reporter.tic, 3))
        message = error_message(error)
        logger.error("trial %d (%s %s) failed: %s", trial.number, entry.label, shown, message)
        trial.set_user_attr("error", message)
        study.tell(trial, state=TrialState.FAIL)
        return f"[trial {trial.number}] {entry.label} {shown}: FAILED: {message}"
    trial.set_user_attr("seconds", round(time.perf_counter() - reporter.tic, 3))  # the whole trial's wall clock
    trial.set_user_attr("trainable_params", metrics["params"]["trainable"])
    trial.set_user_attr("train_seconds", metrics["train"]["seconds"])
    last = metrics["train"]["history"][-1]
    epochs, value = last["epoch"], last[setup.spec.metric]
    if reporter.stopped:
        trial.set_user_attr("stopped", reporter.stopped)
        study.tell(trial, state=TrialState.PRUNED)
        what = "pruned" if reporter.stopped == "halving" else "stopped by the budget"
    else:
        study.tell(trial, value)
        what = "complete"
    return (f"[trial {trial.number}] {entry.label} {shown}: {what} after {epochs} epochs, {setup.spec.metric} "
            f"{value:.4f}")


def draw(setup: SearchSetup, trial) -> tuple[SearchEntry, dict]:
    """The trial's method (a categorical `method`) and its searched settings, keyed like Param.key."""
    entries = {e.label: e for e in setup.entries}
    entry = entries[trial.suggest_categorical("method", list(entries))]
    return entry, {p.key: p.suggest(trial) for p in entry.params}


def study_records(trials) -> list[dict]:
    """One record per Optuna trial, in the shape every search path gives (mmpeft.grids.search_ray too)."""
    records = []
    for t in trials:
        label = t.params.get("method")
        steps = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        records.append({"trial": t.number, "method": label, "state": _state(t), "steps": steps,
                        "values": {k[len(label) + 1:]: v for k, v in t.params.items() if k != "method"},
                        "epochs": t.user_attrs.get("epochs", 0), "seconds": t.user_attrs.get("seconds", 0.0),
                        "final": t.value if t.value is not None else (steps[-1] if steps else None),
                        "trainable_params": t.user_attrs.get("trainable_params"),
                        "train_seconds": t.user_attrs.get("train_seconds"), "dir": t.user_attrs.get("dir"),
                        "error": t.user_attrs.get("error")})
    return records


def chosen_entries(setup: SearchSetup, records: list[dict]) -> list[dict]:
    """grid.methods entries of the `top` best complete trials by final validation score (ties: earlier first)."""
    entries = {e.label: e for e in setup.entries}
    done = sorted((r for r in records if r["state"] == "complete"), key=lambda r: (-r["final"], r["trial"]))
    return [entries[r["method"]].entry(f"t{r['trial']}-{r['method']}", r["values"]) for r in done[:setup.spec.top]]


def leaderboard_states(trials) -> list[dict]:
    return [{"state": _state(t)} for t in trials]


def leaderboard(setup: SearchSetup, records: list[dict], grid_dir: Path) -> list[dict]:
    """One row per trial: leaderboard.csv/md and pareto.png in <grid>/search/."""
    from mmpeft.report.search_report import mark_pareto, pareto_png, write_leaderboard

    rows = [{"trial": r["trial"], "method": r["method"], "params": ", ".join(f"{k}={_fmt(v)}"
                                                                           for k, v in r["values"].items()),
             "state": r["state"], "epochs": r["epochs"], "best_val": max(r["steps"]) if r["steps"] else None,
             "final_val": r["final"], **{k: r[k] for k in ("trainable_params", "train_seconds", "dir", "error")}}
            for r in records]
    mark_pareto(rows)
    write_leaderboard(grid_dir / SEARCH_DIR, rows, setup.spec.metric)
    pareto_png(grid_dir / SEARCH_DIR / "pareto.png", rows, setup.spec.metric,
               f"{setup.compare.recipe.name}: complete trials, validation only")
    return rows


def append_report(grid_dir: Path, setup: SearchSetup, summary: dict, chosen: list[dict]) -> None:
    """The grid's report.md gets a short section on the search that chose its methods."""
    path = grid_dir / "report.md"
    states, budget = summary["states"], summary["budget"]
    given = " and ".join(f"{v} {'epochs' if k == 'epochs' else 'GPU-hours'}" for k, v in budget["given"].items()
                         if v is not None)
    used = f"{budget['used']['epochs']} epochs, {budget['used']['gpu_hours']} wall-clock hours"
    lines = ["", "## Search", "",
             f"The methods above were chosen by `mmpeft search`: {summary['trials']} trials "
             f"({', '.join(f'{n} {s}' for s, n in states.items())}) over {len(setup.entries)} methods, successive "
             f"halving from {setup.spec.min_epochs} epoch(s) by a factor {setup.spec.reduction_factor}, ranked by "
             f"`{setup.spec.metric}` on the validation split only; budget used {used} of {given}. The "
             f"{len(chosen)} best complete trials ({', '.join(e['label'] for e in chosen)}) were re-run over the "
             "seeds and evaluated once on test (the tables above).", "",
             f"Every trial: [search/leaderboard.md]({SEARCH_DIR}/leaderboard.md) (also `.csv`).", ""]
    if (grid_dir / SEARCH_DIR / "pareto.png").is_file():
        lines += [f"![validation score against trainable parameters and training time]({SEARCH_DIR}/pareto.png)", ""]
    write_text(path, (path.read_text() if path.is_file() else "").rstrip("\n") + "\n" + "\n".join(lines))


def _state(trial) -> str:
    name = trial.state.name.lower()
    if name == "pruned" and trial.user_attrs.get("stopped") == "budget":
        return "stopped"
    return {"fail": "failed"}.get(name, name)


def _states(rows: list[dict]) -> dict[str, int]:
    return dict(Counter(row["state"] for row in rows))


def _budget_text(setup: SearchSetup, trials) -> str:
    budget, (epochs, seconds) = setup.spec.budget, budget_used(trials)
    parts = [f"{epochs}/{budget.epochs} epochs"] if budget.epochs is not None else []
    parts += [f"{seconds / 3600:.3f}/{budget.gpu_hours} h"] if budget.gpu_hours is not None else []
    return ", ".join(parts)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
