"""`mmpeft continual RECIPE`: train a task sequence on one backbone + method, with a regulariser, and measure R.

Order of a run: read every task's data -> zero-shot accuracy of the untouched backbone on each task (and the
control set) -> apply the method -> for each task: regulariser.begin_task, the ordinary Trainer (with the
regulariser as its callback), regulariser.end_task, evaluate every task's test set (row i of R) and the control
set, checkpoint -> metrics.json, plots, report.md, the final adapter.

The checkpoint after each task (`state/`: trainable weights, regulariser tensors and facts, R so far) is written
beside and swapped in, so it is whole or absent. `--resume RUN_DIR` restores it and continues at the next task;
a task interrupted midway also continues from the Trainer's own checkpoint (`tasks/<i>/checkpoints/last`). Each
task seeds with (seed + task index), so a resumed run gives the numbers an unbroken run gives.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from mmpeft.core.distributed import process_state
from mmpeft.core.io import write_json
from mmpeft.data import ImageDataset, LabelSet, collate_images
from mmpeft.data.loader import loader_settings
from mmpeft.evaluation import classification_metrics, predict
from mmpeft.methods import METHODS, count_parameters
from mmpeft.objectives import Classification
from mmpeft.runs.build import apply_method, load_base
from mmpeft.runs.folder import ADAPTER_DIR, METRICS_FILE, RECIPE_FILE, discard_if_nothing_ran, new_run_dir, run_logging
from mmpeft.sequences.metrics import summarise
from mmpeft.sequences.regularisers import Regulariser, TaskContext, make_regulariser, trainable_parameters
from mmpeft.sequences.regularisers.base import copy_into
from mmpeft.sequences.report import write_continual_report
from mmpeft.sequences.sequence import TaskSequence, load_sequence
from mmpeft.sequences.tasks import ContinualRecipe, load_continual_recipe
from mmpeft.train import CHECKPOINT_DIR, Trainer

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone

logger = logging.getLogger("mmpeft")

STATE_DIR = "state"
TASKS_DIR = "tasks"
TASK_ADAPTERS_DIR = "task_adapters"


@dataclass
class SequenceProgress:
    """What the per-task checkpoint records besides tensors."""

    done: int = 0  # tasks finished
    matrix: list[list[float]] = field(default_factory=list)  # rows of R so far
    control: list[float] = field(default_factory=list)  # control accuracy after each finished task
    zero_shot: dict | None = None  # {"tasks": [b_j], "control": float | None}
    train: list[dict] = field(default_factory=list)  # per task: steps, seconds, history


class RecordingClassification(Classification):
    """Cross-entropy over label texts that leaves the batch's logits in the batch (`logits`), so a regulariser
    that needs them (LwF) does not run a second forward."""

    def loss(self, batch: dict) -> torch.Tensor:
        logits = self.logits(batch)
        batch["logits"] = logits
        return F.cross_entropy(logits, batch["labels"].to(self.backbone.device))


def continual(recipe: str | Path | dict | ContinualRecipe | None, overrides: list[str] | dict | None = None,
              resume: str | Path | None = None) -> dict:
    """Run a continual recipe (or resume RUN_DIR) and return its metrics (also in <run folder>/metrics.json)."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / RECIPE_FILE).is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no {RECIPE_FILE} there; is it a continual run folder?")
        if (run_dir / METRICS_FILE).is_file():
            logger.info("run %s is already complete", run_dir)
            return json.loads((run_dir / METRICS_FILE).read_text())
        loaded = load_continual_recipe(run_dir / RECIPE_FILE, overrides)
    else:
        if recipe is None:
            raise ValueError("mmpeft continual needs a recipe file or --resume RUN_DIR")
        loaded = load_continual_recipe(recipe, overrides)
        if loaded.output.name and (Path(loaded.output.dir) / loaded.output.name / STATE_DIR).exists():
            folder = Path(loaded.output.dir) / loaded.output.name
            raise FileExistsError(f"run folder {folder} holds an interrupted continual run; continue it with "
                                  f"`mmpeft continual --resume {folder}` or choose another output.name")
        run_dir = new_run_dir(loaded)  # type: ignore[arg-type]  (it needs .name, .output and .to_yaml only)
    try:
        with run_logging(run_dir), loader_settings(loaded.recipe.data.image_cache, loaded.recipe.train.num_workers):
            try:
                return execute(loaded, run_dir, resume=resume is not None)
            except KeyboardInterrupt:
                logger.info("interrupted; continue with: mmpeft continual --resume %s", run_dir)
                raise
    except Exception:
        if resume is None:
            discard_if_nothing_ran(run_dir, "continual")
        raise


def run_continual_cell(recipe: str | Path | dict | ContinualRecipe, regulariser_name: str | dict, seed: int,
                       overrides: list[str] | dict | None = None, output_dir: str | Path | None = None) -> dict:
    """One cell of a `regularisers x seeds` grid: the recipe with this regulariser and seed, as a flat row.

    `regulariser_name` is a name (its settings come from the recipe when it names the same regulariser, else the
    regulariser's defaults) or a mapping with `name`, settings and an optional `label` (the cell's name in folders
    and rows; needed when one regulariser appears with several settings). The run folder is
    `<output_dir or recipe output.dir>/<recipe name>-<label>-seed<seed>`; a finished one is reused and an interrupted
    one resumed. The row holds the scalar summaries of metrics.json (`average_accuracy`, `average_forgetting`, ...).
    """
    base = load_continual_recipe(recipe, overrides)
    label, cell, run_dir = plan_continual_cell(base, regulariser_name, seed, output_dir)
    if (run_dir / METRICS_FILE).is_file():
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
    else:
        metrics = continual(cell, resume=run_dir if (run_dir / RECIPE_FILE).is_file() else None)
    return {"recipe": base.name, "regulariser": label, "seed": seed, "method": cell.recipe.method.name,
            **metrics["summary"], "run_dir": str(run_dir)}


def plan_continual_cell(base: ContinualRecipe, regulariser_name: str | dict, seed: int,
                        output_dir: str | Path | None = None) -> tuple[str, ContinualRecipe, Path]:
    """(label, the cell's recipe, its run folder) without running it: a grid checks finished cells against it."""
    if isinstance(regulariser_name, dict) and "name" in regulariser_name:
        settings = dict(regulariser_name)
    elif isinstance(regulariser_name, str):
        settings = asdict(base.regulariser) if regulariser_name == base.regulariser.name else {"name": regulariser_name}
    else:
        raise ValueError(f"regularisers: each entry is a name or a mapping with `name`, got {regulariser_name!r}")
    label = str(settings.pop("label", None) or settings["name"])
    output = {"dir": str(output_dir) if output_dir is not None else base.output.dir,
              "name": f"{base.name}-{label}-seed{seed}"}
    cell = load_continual_recipe(base.to_dict() | {"regulariser": settings, "seed": seed, "output": output})
    return label, cell, Path(output["dir"]) / output["name"]


# --- one sequence ---------------------------------------------------------------------------------------------------
def execute(recipe: ContinualRecipe, run_dir: Path, resume: bool = False) -> dict:
    base = recipe.recipe
    set_seed(recipe.seed, deterministic=False)
    sequence = load_sequence(recipe)
    logger.info("tasks: %s", "; ".join(f"{t.task.name}: {len(t.train)} train / {len(t.test)} test, classes "
                                       f"{','.join(t.classes)}" for t in sequence.tasks))
    backbone = load_base(base)
    progress = read_progress(run_dir) if resume else SequenceProgress()
    if progress.zero_shot is None and base.eval.zero_shot:
        progress.zero_shot = evaluate_step(backbone, sequence, None, recipe, step=None)
        print_row("zero-shot", progress.zero_shot["tasks"], progress.zero_shot["control"])
    method = METHODS.get(base.method.name)()
    apply_method(backbone, base, sequence.labels)  # every class of the sequence (label-shaped methods)
    params = count_parameters(backbone)
    regulariser = make_regulariser(recipe.regulariser, recipe.seed)
    if progress.done:
        restore_state(run_dir, backbone, regulariser)
        logger.info("resuming at task %d of %d (%s)", progress.done + 1, len(sequence.tasks),
                    sequence.tasks[progress.done].task.name if progress.done < len(sequence.tasks) else "-")
    for index in range(progress.done, len(sequence.tasks)):
        train_info = train_task(recipe, sequence, backbone, regulariser, index, run_dir)
        row = evaluate_step(backbone, sequence, regulariser, recipe, step=index)
        progress.matrix.append(row["tasks"])
        if row["control"] is not None:
            progress.control.append(row["control"])
        progress.train.append(train_info)
        progress.done = index + 1
        if process_state().is_main_process:  # one writer, whatever the number of processes
            save_state(run_dir, backbone, regulariser, progress)
            drop_task_checkpoint(run_dir, index)
        process_state().wait_for_everyone()
        print_row(f"after {sequence.tasks[index].task.name}", row["tasks"], row["control"])
    return finish(recipe, sequence, backbone, method, regulariser, progress, params, run_dir)


def train_task(recipe: ContinualRecipe, sequence: TaskSequence, backbone: Backbone, regulariser: Regulariser,
               index: int, run_dir: Path) -> dict:
    """One task through the ordinary Trainer; a task interrupted midway continues from the Trainer's checkpoint."""
    base, task = recipe.recipe, sequence.tasks[index]
    context, objective = task_context(recipe, sequence, backbone, index)
    labels = context.labels
    set_seed(recipe.seed + index, deterministic=False)
    regulariser.begin_task(context)
    evaluate_val = None
    if task.val:
        val_set = task.dataset("val")

        def evaluate_val() -> dict:
            truth, predicted = predict(backbone, val_set, labels, base.eval.batch_size, desc="val")
            scores = classification_metrics(truth, predicted, labels.names)
            return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}

    task_dir = run_dir / TASKS_DIR / str(index)
    trainer = Trainer(backbone, objective, task.dataset("train", augment=True, seed=recipe.seed), base.train,
                      recipe.seed, task_dir, evaluate_val=evaluate_val, callbacks=(regulariser,))
    print(f"task {index + 1}/{len(sequence.tasks)} [{task.task.name}]: {len(task.train)} examples, "
          f"{len(labels)} classes, regulariser {regulariser.name}", flush=True)
    result = trainer.fit(resume=(trainer.checkpoint_dir / "progress.json").is_file())
    regulariser.end_task(context)
    return {"task": task.task.name, "steps": result.global_step, "epochs_run": result.epoch,
            "seconds": round(result.train_seconds, 3), "best_epoch": result.best_epoch, "history": result.history}


def task_context(recipe: ContinualRecipe, sequence: TaskSequence, backbone: Backbone, index: int,
                 ) -> tuple[TaskContext, RecordingClassification]:
    """What the regulariser sees of task `index`, and the objective that trains it (over every class seen so far)."""
    labels = sequence.labels_upto(index)
    objective = RecordingClassification(backbone, labels)
    context = TaskContext(index=index, backbone=backbone, train_set=sequence.tasks[index].dataset("train"),
                          train_sets=[t.dataset("train") for t in sequence.tasks], labels=labels,
                          previous_classes=sequence.previous_classes(index), logits=objective.logits,
                          collate=collate_images(backbone.preprocess, backbone.preprocess_fitted),
                          batch_size=recipe.recipe.eval.batch_size,
                          seed=recipe.seed + index, is_last=index == len(sequence.tasks) - 1)
    return context, objective


def evaluate_step(backbone: Backbone, sequence: TaskSequence, regulariser: Regulariser | None, recipe: ContinualRecipe,
                  step: int | None) -> dict:
    """Accuracy on every task's test set after task `step` (None: the untouched backbone), plus the control set."""
    batch_size = recipe.recipe.eval.batch_size
    row = []
    for j, task in enumerate(sequence.tasks):
        labels = sequence.labels_upto(j) if step is None else sequence.eval_labels(step, j)
        if regulariser is None:
            row.append(accuracy(backbone, task.dataset("test"), labels, batch_size))
        else:
            with regulariser.evaluating(j):
                row.append(accuracy(backbone, task.dataset("test"), labels, batch_size))
    control = None
    if sequence.control is not None and sequence.control_labels is not None:
        control = accuracy(backbone, sequence.control.dataset("test"), sequence.control_labels, batch_size)
    return {"tasks": row, "control": control}


def accuracy(backbone: Backbone, dataset: ImageDataset, labels: LabelSet, batch_size: int) -> float:
    truth, predicted = predict(backbone, dataset, labels, batch_size, desc="eval")
    return float(np.mean(truth == predicted))


def finish(recipe: ContinualRecipe, sequence: TaskSequence, backbone: Backbone, method, regulariser: Regulariser,
           progress: SequenceProgress, params: dict, run_dir: Path) -> dict:
    base = recipe.recipe
    zero_shot = progress.zero_shot or {}
    metrics = {
        "recipe": recipe.name, "backbone": base.backbone.id, "method": base.method.name,
        "regulariser": recipe.regulariser.name, "seed": recipe.seed,
        "protocol": "class-incremental, single head: scored against every class seen so far (no task id)"
                    if any(t.task.selects_classes for t in sequence.tasks) else
                    "domain-incremental: every task scored against the same classes (no task id)",
        "tasks": [{"name": t.task.name, "classes": t.classes, "shift": list(t.shifts),
                   "counts": {"train": len(t.train), "val": len(t.val), "test": len(t.test)}} for t in sequence.tasks],
        "accuracy_matrix": progress.matrix,
        "zero_shot": zero_shot.get("tasks"),
        "control": ({"name": sequence.control.task.name, "zero_shot": zero_shot.get("control"),
                     "after_task": progress.control} if sequence.control is not None else None),
        "summary": summarise(progress.matrix, zero_shot.get("tasks"), progress.control or None),
        "params": params,
        "train": progress.train,
    }
    if process_state().is_main_process:
        save_adapters(method, backbone, regulariser, recipe, run_dir)
        write_continual_report(run_dir, metrics)
        write_json(run_dir / METRICS_FILE, metrics)
        shutil.rmtree(run_dir / STATE_DIR, ignore_errors=True)
    process_state().wait_for_everyone()
    summary = metrics["summary"]
    forgetting = summary["average_forgetting"]
    print(f"{recipe.regulariser.name}: average accuracy {summary['average_accuracy']:.3f}, average forgetting "
          f"{'n/a' if forgetting is None else f'{forgetting:.3f}'}; run folder {run_dir}", flush=True)
    return metrics


def save_adapters(method, backbone: Backbone, regulariser: Regulariser, recipe: ContinualRecipe, run_dir: Path) -> None:
    """The final trainable state in the method's own format; one per task too when the regulariser keeps them."""
    _save_method_state(method, backbone, recipe, run_dir / ADAPTER_DIR)
    per_task = getattr(regulariser, "task_states", None)
    if per_task is None:
        return
    params = trainable_parameters(backbone)
    current = {name: p.detach().clone() for name, p in params.items()}
    for index, state in per_task().items():
        copy_into(params, state)
        _save_method_state(method, backbone, recipe, run_dir / TASK_ADAPTERS_DIR / f"task{index + 1}")
    copy_into(params, current)


def _save_method_state(method, backbone, recipe: ContinualRecipe, final: Path) -> None:
    staging = final.with_name(f".{final.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    method.save(backbone, recipe.recipe.method, staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)


# --- the per-task checkpoint ----------------------------------------------------------------------------------------
def save_state(run_dir: Path, backbone: Backbone, regulariser: Regulariser, progress: SequenceProgress) -> None:
    """Written into a staging folder and swapped in: an interrupted save leaves the previous checkpoint whole."""
    final = run_dir / STATE_DIR
    staging, old = final.with_name(f".{STATE_DIR}.staging"), final.with_name(f".{STATE_DIR}.previous")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(backbone).items()}
    save_file(trainable, str(staging / "trainable.safetensors"))
    tensors, meta = regulariser.state()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / "regulariser.safetensors"))
    write_json(staging / "regulariser.json", {"name": regulariser.name, **meta})
    write_json(staging / "progress.json", asdict(progress))  # last: a staging folder without it is incomplete
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def drop_task_checkpoint(run_dir: Path, index: int) -> None:
    """The Trainer's mid-task checkpoint is obsolete once the task's own checkpoint is written (tracking logs stay)."""
    task_dir = run_dir / TASKS_DIR / str(index)
    shutil.rmtree(task_dir / CHECKPOINT_DIR, ignore_errors=True)
    for folder in (task_dir, task_dir.parent):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def read_progress(run_dir: Path) -> SequenceProgress:
    for folder in (run_dir / STATE_DIR, run_dir / f".{STATE_DIR}.previous"):  # .previous: killed mid-swap
        if (folder / "progress.json").is_file():
            return SequenceProgress(**json.loads((folder / "progress.json").read_text()))
    return SequenceProgress()


def restore_state(run_dir: Path, backbone: Backbone, regulariser: Regulariser) -> None:
    folder = run_dir / STATE_DIR
    if not (folder / "progress.json").is_file():
        folder = run_dir / f".{STATE_DIR}.previous"
    saved = json.loads((folder / "regulariser.json").read_text())
    if saved.get("name") != regulariser.name:
        raise ValueError(f"--resume: the checkpoint was written by regulariser {saved.get('name')!r}, "
                         f"the recipe names {regulariser.name!r}")
    copy_into(trainable_parameters(backbone), load_file(str(folder / "trainable.safetensors")))
    regulariser.load_state(load_file(str(folder / "regulariser.safetensors")), saved)


def print_row(what: str, row: list[float], control: float | None) -> None:
    text = f"{what:>22}: " + "  ".join(f"{value:.3f}" for value in row)
    if control is not None:
        text += f"  | control {control:.3f}"
    print(text, flush=True)
