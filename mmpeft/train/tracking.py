"""Experiment trackers (`train.log_with`: tensorboard, mlflow, wandb) through accelerate's tracker classes.

A run logs the recipe as parameters, train/val metrics per step and epoch, and at the end its test metrics and its
report, plots and metrics.json as artifacts. Runs that share `train.tracking_experiment` (the cells of a grid) are
one MLflow experiment and one W&B group; without it, the experiment is the recipe's name. A resumed run continues
the tracker runs it started (their ids are kept in <run>/tracking/runs.json), rather than starting new ones.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from mmpeft.core.io import write_json

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mmpeft.specs import TrainSpec

logger = logging.getLogger("mmpeft")

# tracker -> (module it needs, how to install it)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install 'mmpeft[mlflow]'"),
    "wandb": ("wandb", "pip install 'mmpeft[wandb]'"),
}
RUN_IDS_FILE = "runs.json"  # under <run>/tracking: each tracker's run id, so that a resumed run continues it
ARTIFACT_SUFFIXES = (".md", ".png", ".json", ".yaml", ".csv", ".log")
SUMMARY_SECTIONS = ("zero_shot", "test", "answers", "retrieval")
SKIPPED_KEYS = ("per_class", "confusion_matrix", "examples")


class TrackingError(ValueError):
    """A tracker that would not start, with what to change."""


def trackers_of(spec: TrainSpec) -> tuple[str, ...]:
    """`train.log_with` as tracker names, each once, in order."""
    return tuple(dict.fromkeys(spec.log_with or ()))


def missing_tracker_problems(spec: TrainSpec) -> list[str]:
    """RecipeError entries for trackers whose package is not installed, or an MLflow file store that is a file."""
    problems = []
    for name in (name for name in trackers_of(spec) if name in TRACKER_PACKAGES):  # unknown ones: already reported
        module, install = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            problems.append(f"train.log_with: {name} is not installed; `{install}` or remove it from the list")
    if "mlflow" in trackers_of(spec):
        problems += store_problems(spec.tracking_uri)
    return problems


WANDB_FORBIDDEN = "/\\#?%:"  # W&B refuses a project name with any of these (wandb's own check)


def experiment_problems(spec: TrainSpec, recipe_name: str | None) -> list[str]:
    """W&B's project is `train.tracking_experiment` (default: the recipe's name): one it refuses is a recipe error,
    not a failed start after the run folder was made."""
    experiment = spec.tracking_experiment or recipe_name
    if "wandb" not in trackers_of(spec) or not experiment:
        return []
    found = sorted({c for c in experiment if c in WANDB_FORBIDDEN})
    if not found and len(experiment) <= 128:
        return []
    key = "train.tracking_experiment" if spec.tracking_experiment else "train.tracking_experiment (default: name)"
    why = (f"contains {', '.join(map(repr, found))}" if found else f"is {len(experiment)} characters long")
    return [f"{key}: {experiment!r} is the W&B project name, which {why}; W&B takes up to 128 characters without "
            f"{' '.join(WANDB_FORBIDDEN[:-1])} or {WANDB_FORBIDDEN[-1]}; set train.tracking_experiment to such a name"]


def store_problems(uri: str) -> list[str]:
    """A local MLflow store (a folder, or a file: URI) must be a folder or creatable as one."""
    if not uri.strip():
        return ["train.tracking_uri: empty; give a folder (e.g. ./mlruns) or an MLflow URI (sqlite:///mlflow.db)"]
    if ("://" in uri and not uri.startswith("file://")) or uri.startswith(("sqlite:", "databricks")):
        return []
    from urllib.parse import unquote, urlparse

    path = Path(unquote(urlparse(uri).path) if uri.startswith("file:") else uri).expanduser()
    above = next((folder for folder in (path, *path.absolute().parents) if folder.exists()), None)
    if above is not None and not above.is_dir():
        return [f"train.tracking_uri: {uri!r}: {above} is a file, but MLflow's local store is a folder; give a "
                "folder path (e.g. ./mlruns) or a database URI (sqlite:///mlflow.db)"]
    return []


def mlflow_uri(uri: str) -> str:
    """A plain folder (the default ./mlruns) becomes a file: URI of its absolute path; URIs pass through."""
    if "://" in uri or uri.startswith(("file:", "sqlite:", "databricks")):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def start_tracking(accelerator: Accelerator, spec: TrainSpec, run_dir: Path, config: dict | None) -> None:
    """Initialise the trackers the accelerator was made with: run = the run folder's name; MLflow experiment, W&B
    project and group = `train.tracking_experiment` (a run sets it to its recipe's name when unset)."""
    names = trackers_of(spec)
    if not names:
        return
    experiment = spec.tracking_experiment or run_dir.name
    earlier = earlier_run_ids(run_dir)
    init_kwargs: dict = {}
    if "mlflow" in names:
        import mlflow

        uri = mlflow_uri(spec.tracking_uri)
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind an opt-in; a local folder is what we asked
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        init_kwargs["mlflow"] = {"run_name": run_dir.name}
        if "mlflow" in earlier:
            init_kwargs["mlflow"]["run_id"] = earlier["mlflow"]
    if "wandb" in names:
        (run_dir / "tracking").mkdir(parents=True, exist_ok=True)
        init_kwargs["wandb"] = {"name": run_dir.name, "dir": str(run_dir / "tracking"), "group": experiment}
        if "wandb" in earlier:
            init_kwargs["wandb"].update(id=earlier["wandb"], resume="allow")
    try:
        accelerator.init_trackers(experiment, config=config, init_kwargs=init_kwargs)
    except Exception as error:  # a tracker's own start-up error (no login, unreachable server, bad URI), in one line
        hints = {"wandb": "W&B without an account or network: set WANDB_MODE=offline",
                 "mlflow": f"MLflow: check train.tracking_uri ({spec.tracking_uri!r})"}
        said = str(error).strip().splitlines()[0].rstrip(". ") if str(error).strip() else ""
        raise TrackingError(f"train.log_with: {', '.join(names)} did not start: {type(error).__name__}: {said}. "
                            + "; ".join(hints[name] for name in names if name in hints)) from error
    keep_run_ids(accelerator, run_dir)
    logger.info("tracking with %s (experiment %s, run %s%s)", ", ".join(names), experiment, run_dir.name,
                ", continued" if earlier else "")


def earlier_run_ids(run_dir: Path) -> dict[str, str]:
    """The tracker run ids this run folder started before (an interrupted run being resumed); {} for a new run."""
    path = run_dir / "tracking" / RUN_IDS_FILE
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: new tracker runs, as before resume existed
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def keep_run_ids(accelerator: Accelerator, run_dir: Path) -> None:
    if not accelerator.is_main_process:
        return
    ids = {}
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":  # accelerate's MLflowTracker / WandBTracker, started just now
            ids["mlflow"] = tracker.active_run.info.run_id
        elif tracker.name == "wandb":
            ids["wandb"] = tracker.run.id
    if ids:
        write_json(run_dir / "tracking" / RUN_IDS_FILE, ids)


def tracker_arguments(spec: TrainSpec, run_dir: Path) -> dict:
    """Accelerator keyword arguments for the recipe's trackers (none without `train.log_with`)."""
    names = trackers_of(spec)
    return {"log_with": list(names), "project_dir": str(run_dir / "tracking")} if names else {}


def epoch_metrics(metrics: dict) -> dict[str, float]:
    """An epoch's history entry as tracker metrics: "epoch", "val/accuracy", "val/macro_f1", ..."""
    return {"epoch": metrics["epoch"], **{f"val/{k[4:]}": v for k, v in metrics.items() if k.startswith("val_")}}


def summary_metrics(metrics: dict) -> dict[str, float]:
    """The run's final numbers flattened ("test/accuracy", "answers/test/exact_match", ...): scalars only."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                if key not in SKIPPED_KEYS:
                    walk(f"{prefix}/{key}", child)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = float(value)

    for section in SUMMARY_SECTIONS:
        if section in metrics:
            walk(section, metrics[section])
    return flat


def run_artifacts(run_dir: Path) -> list[Path]:
    """The report, plots, metrics and recipe of a finished run folder (not its weights or checkpoints)."""
    return sorted(p for p in Path(run_dir).iterdir() if p.is_file() and p.suffix in ARTIFACT_SUFFIXES)


def finish_tracking(accelerator: Accelerator, step: int, metrics: dict | None = None,
                    artifacts: Iterable[Path] = (), base: Path | None = None, failed: bool = False) -> None:
    """Log the final metrics and files to every tracker, then finish each; a failed run is marked so (MLflow status
    FAILED, W&B exit code 1) instead of looking finished."""
    if failed and accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if tracker.name == "mlflow":
                import mlflow

                mlflow.end_run(status="FAILED")
            elif tracker.name == "wandb":
                tracker.tracker.finish(exit_code=1)
    if metrics:
        accelerator.log(summary_metrics(metrics), step=step)
    files = [Path(p) for p in artifacts]
    if files and accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if tracker.name == "mlflow":
                for path in files:
                    tracker.log_artifact(str(path))
            elif tracker.name == "wandb":
                for path in files:
                    tracker.tracker.save(str(path), base_path=str(base or path.parent), policy="now")
    for tracker in accelerator.trackers:  # not accelerator.end_training(): it also destroys the process group,
        tracker.finish()  # which a multi-process run still needs (evaluation, the final barrier)
    accelerator.trackers = []


def end_tracking(trainer, metrics: dict | None = None, run_dir: Path | None = None, failed: bool = False) -> None:
    """End a Trainer's trackers (made with `keep_tracking_open`) with the run's final metrics and files; once."""
    if trainer.tracking:
        trainer.tracking = False
        files = run_artifacts(run_dir) if run_dir is not None else []
        finish_tracking(trainer.accelerator, trainer.progress.global_step, metrics, files, run_dir, failed)
