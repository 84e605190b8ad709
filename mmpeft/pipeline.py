"""`mmpeft.run(recipe)`: zero-shot -> apply method -> train -> evaluate -> save -> report, in one run folder."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, set_seed

from mmpeft.backbones import load_backbone
from mmpeft.data import ImageDataset, load_data, parse_shift, shift_label
from mmpeft.data.feature_cache import FeatureBinding, bind_features, keep_after_apply
from mmpeft.distributed import process_state
from mmpeft.evaluation import classification_metrics, predict
from mmpeft.io import write_json, write_text
from mmpeft.methods import METHODS, count_parameters
from mmpeft.objectives import make_objective
from mmpeft.recipe import Recipe, load_recipe
from mmpeft.train import Trainer

logger = logging.getLogger("mmpeft")

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"


@dataclass
class RunContext:
    """What one run has loaded: shared by run() and by commands built on it (compare, continual)."""

    recipe: Recipe
    run_dir: Path
    backbone: object
    data: object


def run(recipe: str | Path | dict | Recipe, overrides: list[str] | dict | None = None,
        resume: str | Path | None = None) -> dict:
    """Run a recipe end to end and return its metrics (also written to <run folder>/metrics.json)."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / RECIPE_FILE).is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no {RECIPE_FILE} there; is it a run folder?")
        if (run_dir / METRICS_FILE).is_file():
            logger.info("run %s is already complete", run_dir)
            import json

            return json.loads((run_dir / METRICS_FILE).read_text())
        recipe = load_recipe(run_dir / RECIPE_FILE, overrides)
    else:
        recipe = load_recipe(recipe, overrides)
        run_dir = new_run_dir(recipe)
    with run_logging(run_dir):
        return execute(recipe, run_dir, resume=resume is not None)


def new_run_dir(recipe: Recipe) -> Path:
    """One folder per run, named by the main process (its clock) when several processes share the run."""
    state = process_state()
    name = [recipe.output.name or f"{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"]
    if state.num_processes > 1:
        broadcast_object_list(name)
    run_dir = Path(recipe.output.dir) / name[0]
    if (run_dir / METRICS_FILE).exists():
        raise FileExistsError(f"run folder {run_dir} already holds a finished run; choose another output.name")
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / RECIPE_FILE, recipe.to_yaml())
    state.wait_for_everyone()
    return run_dir


def execute(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    set_seed(recipe.seed, deterministic=False)
    data = load_data(recipe.data, recipe.seed)
    logger.info("data: %s", ", ".join(f"{k}={v}" for k, v in data.info.get("counts", {}).items()))
    set_seed(recipe.seed, deterministic=False)  # backbone.init: scratch draws its weights from the seed alone
    backbone = place(load_backbone(recipe.backbone), recipe)
    if hasattr(backbone, "configure"):  # generative: question, answer template, scoring and generation settings
        backbone.configure(recipe)
    method = METHODS.get(recipe.method.name)()
    metrics: dict = {"recipe": recipe.name, "backbone": recipe.backbone.id, "method": recipe.method.name,
                     "seed": recipe.seed, "data": data.info}
    test_sets = evaluation_sets(recipe, data)
    features = bind_features(recipe, backbone)  # image features of the untouched image tower, computed once
    if recipe.eval.zero_shot and method.name != "zero_shot":
        metrics["zero_shot"] = evaluate_sets(backbone, test_sets, data.labels, recipe, "zero-shot", features)
        print_line("zero-shot", metrics["zero_shot"])
        if recipe.eval.generate:
            metrics["answers"] = {"zero_shot": evaluate_answer_set(backbone, test_sets, data, recipe, "zero-shot")}
        if wants_retrieval(recipe):
            metrics["retrieval"] = {"zero_shot": evaluate_retrieval_set(backbone, test_sets, data, recipe, "zero-shot")}
    set_seed(recipe.seed, deterministic=False)  # the method's init must not depend on whether zero-shot ran
    method.apply(backbone, recipe.method, data.labels)
    metrics["params"] = count_parameters(backbone)
    logger.info("method %s: %d trainable of %d parameters (%.3f%%)", method.name, metrics["params"]["trainable"],
                metrics["params"]["total"], metrics["params"]["percent"])
    features = keep_after_apply(features, recipe, method, backbone)
    if method.trains:
        metrics["train"], final_state = train(recipe, run_dir, backbone, data, resume, features)
        if final_state is not None:  # FSDP left the trained model sharded: evaluate and save a whole one
            backbone = rebuild(recipe, method, data, final_state)
    metrics["test"] = evaluate_sets(backbone, test_sets, data.labels, recipe, "test", features)
    metrics["feature_cache"] = features.stats() if features is not None else {"used": False}
    if recipe.eval.generate:
        metrics.setdefault("answers", {})["test"] = evaluate_answer_set(backbone, test_sets, data, recipe, "test")
    if wants_retrieval(recipe):
        metrics.setdefault("retrieval", {})["test"] = evaluate_retrieval_set(backbone, test_sets, data, recipe, "test")
    metrics["memory"] = memory_footprint(backbone)
    print_line(method.name, metrics["test"], metrics["params"])
    state = process_state()
    if state.is_main_process:  # one writer, whatever the number of processes
        save_adapter(method, backbone, recipe, run_dir)
        from mmpeft.report import write_run_report

        write_run_report(run_dir, metrics, data.labels.names)
        write_json(run_dir / METRICS_FILE, metrics)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        logger.info("run folder: %s", run_dir)
    state.wait_for_everyone()
    return metrics


def place(backbone, recipe: Recipe):
    """Move to accelerate's device (GPU when present); quantized weights were placed when loaded."""
    if recipe.backbone.quantization is None:
        backbone.to(process_state().device)
    return backbone


def rebuild(recipe: Recipe, method, data, state: dict):
    """A whole (unsharded) backbone with the method applied and the trained state loaded."""
    from mmpeft.methods.base import load_trainable_state

    backbone = place(load_backbone(recipe.backbone), recipe)
    if hasattr(backbone, "configure"):
        backbone.configure(recipe)
    method.apply(backbone, recipe.method, data.labels)
    load_trainable_state(backbone, state)
    return backbone


def train(recipe: Recipe, run_dir: Path, backbone, data, resume: bool,
          features: FeatureBinding | None = None) -> tuple[dict, dict | None]:
    """Train; returns the summary and, under FSDP, the whole trained state (else None: `backbone` holds it)."""
    train_set = data.dataset("train", augment=True, seed=recipe.seed, spec=recipe.data)
    if features is not None and train_set.augment is not None:
        logger.info("feature cache: off for training: data.augment changes the images every epoch "
                    "(val and test features stay cached)")
    elif features is not None:
        train_set = features.wrap(train_set, "train")
    objective = make_objective(recipe.train.objective, backbone, data.labels, train_set)
    val_set = data.dataset("val") if data.val else None
    if val_set is not None and features is not None:
        val_set = features.wrap(val_set, "val")

    def evaluate_val() -> dict:
        truth, predicted = predict(backbone, val_set, data.labels, recipe.eval.batch_size, desc="val")
        scores = classification_metrics(truth, predicted, data.labels.names)
        return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}

    trainer = Trainer(backbone, objective, train_set, recipe.train, recipe.seed, run_dir,
                      evaluate_val=evaluate_val if val_set is not None else None, tracker_config=_flat(recipe))
    progress = trainer.fit(resume=resume)
    seconds = progress.train_seconds
    summary = {"epochs_run": progress.epoch, "steps": progress.global_step, "seconds": round(seconds, 3),
               "samples_per_second": round(progress.samples_seen / seconds, 2) if seconds else None,
               "best_epoch": progress.best_epoch, "history": progress.history}
    return summary, trainer.final_state


def evaluation_sets(recipe: Recipe, data) -> dict[str, ImageDataset]:
    """The test split under the recipe's shift, plus one entry per `data.eval_shifts`."""
    sets = {shift_label(data.shifts): data.dataset("test")}
    for spec in recipe.data.eval_shifts:
        sets.setdefault(spec, ImageDataset(data.test, shifts=parse_shift(spec)))
    return sets


def evaluate_sets(backbone, sets: dict[str, ImageDataset], labels, recipe: Recipe, desc: str,
                  features: FeatureBinding | None = None) -> dict:
    """{"accuracy", "macro_f1", ... for the recipe's shift, "shifts": {name: {...}} when several}."""
    results = {}
    for name, dataset in sets.items():
        if features is not None:
            dataset = features.wrap(dataset, f"{desc} [{name}]")
        truth, predicted = predict(backbone, dataset, labels, recipe.eval.batch_size, desc=f"{desc} [{name}]")
        results[name] = classification_metrics(truth, predicted, labels.names)
    main = dict(next(iter(results.values())))
    if len(results) > 1:
        main["shifts"] = {name: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]} for name, r in results.items()}
    return main


def wants_retrieval(recipe: Recipe) -> bool:
    """`eval.retrieval`, or by default: on when training is contrastive (image-caption matching)."""
    if recipe.eval.retrieval is not None:
        return recipe.eval.retrieval
    return recipe.train.objective == "contrastive"


def evaluate_retrieval_set(backbone, sets: dict[str, ImageDataset], data, recipe: Recipe, desc: str) -> dict:
    """Retrieval on the test split under the recipe's own shift (the first of `sets`), printed in one line."""
    from mmpeft.evaluation.retrieval import evaluate_retrieval

    name, dataset = next(iter(sets.items()))
    result = evaluate_retrieval(backbone, dataset, data.labels, recipe.eval.batch_size, desc=f"{desc} retrieval")
    result["shift"] = name
    i2t, t2i = result["image_to_text"], result["text_to_image"]
    print(f"{desc:>10}: retrieval [{name}] image->text R@1 {i2t['R@1']:.3f} R@5 {i2t['R@5']:.3f}  "
          f"text->image R@1 {t2i['R@1']:.3f} R@5 {t2i['R@5']:.3f}", flush=True)
    return result


def evaluate_answer_set(backbone, sets: dict[str, ImageDataset], data, recipe: Recipe, desc: str) -> dict:
    """Free-form answers (generative backbones) on the test split under the recipe's own shift, printed."""
    from mmpeft.evaluation.answers import evaluate_answers

    result = evaluate_answers(backbone, next(iter(sets.values())), data.labels, recipe.eval.batch_size,
                              desc=f"{desc} answers")
    if process_state().is_main_process:
        print(f"{desc:>10}: answers exact match {result['exact_match']:.3f}  normalised match "
              f"{result['normalized_match']:.3f}", flush=True)
    return result


def save_adapter(method, backbone, recipe: Recipe, run_dir: Path) -> None:
    """Saved into a staging folder and renamed: the adapter folder is complete or absent."""
    if not method.trains:
        return
    final, staging = run_dir / ADAPTER_DIR, run_dir / f".{ADAPTER_DIR}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    method.save(backbone, recipe.method, staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)


def memory_footprint(backbone) -> dict:
    from mmpeft.quantization import weight_bytes

    result = {"weights_bytes": weight_bytes(backbone)}  # includes bitsandbytes' quantization state
    if torch.cuda.is_available():
        result["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return result


def print_line(what: str, scores: dict, params: dict | None = None) -> None:
    if not process_state().is_main_process:
        return
    text = f"{what:>10}: accuracy {scores['accuracy']:.3f}  macro-F1 {scores['macro_f1']:.3f}"
    for name, shifted in scores.get("shifts", {}).items():
        text += f"  [{name}: {shifted['accuracy']:.3f}]"
    if params:
        text += f"  trainable {params['trainable']:,} / {params['total']:,} ({params['percent']:.2f}%)"
    print(text, flush=True)


class run_logging:
    """Log to <run>/train.log (appending on resume) for the duration of a run."""

    def __init__(self, run_dir: Path):
        main = process_state().is_main_process
        self.handler = logging.FileHandler(run_dir / "train.log") if main else logging.NullHandler()
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self):
        logger.addHandler(self.handler)
        if not process_state().is_main_process:
            logger.setLevel(logging.WARNING)
        elif logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        logger.info("finished in %.1f s", time.perf_counter() - self.started)
        logger.removeHandler(self.handler)
        self.handler.close()


def _flat(recipe: Recipe) -> dict:
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", recipe.to_dict())
    return flat
