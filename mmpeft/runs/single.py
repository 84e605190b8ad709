"""`mmpeft.run(recipe)`: zero-shot -> apply method -> train -> evaluate -> save -> report, in one run folder."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed

from mmpeft.backbones import Backbone
from mmpeft.backbones.quantization import weight_bytes
from mmpeft.core.distributed import process_state
from mmpeft.core.io import write_json
from mmpeft.data import DataError, load_data
from mmpeft.data.conversation_data import CONVERSATION_SOURCES, load_conversations
from mmpeft.data.loader import loader_settings
from mmpeft.evaluation import classification_metrics, predict
from mmpeft.evaluation.retrieval import evaluate_retrieval
from mmpeft.features import FeatureBinding, bind_features, keep_after_apply
from mmpeft.methods import METHODS, count_parameters
from mmpeft.objectives import make_objective
from mmpeft.report import write_run_report
from mmpeft.runs.build import apply_method, build, load_base
from mmpeft.runs.conversations import execute_conversations
from mmpeft.runs.evaluate import (
    evaluate_answer_set,
    evaluate_retrieval_set,
    evaluate_sets,
    evaluation_sets,
    print_line,
    wants_retrieval,
)
from mmpeft.runs.folder import (
    METRICS_FILE,
    RECIPE_FILE,
    check_same_data,
    discard_if_nothing_ran,
    new_run_dir,
    run_logging,
    save_adapter,
    write_labels,
)
from mmpeft.runs.recipe import load_recipe
from mmpeft.runs.texts import check_text_lengths
from mmpeft.specs import Recipe, TrainSpec
from mmpeft.train import Callback, Trainer
from mmpeft.train.tracking import end_tracking

logger = logging.getLogger("mmpeft")
NO_LABELS = "classification metrics not computed: caption-only data has no labels (see retrieval)"
NOT_TESTED = "test split not evaluated (eval.test: false): this run is judged on validation only"


def run(recipe: str | Path | dict | Recipe, overrides: list[str] | dict | None = None,
        resume: str | Path | None = None, callbacks: tuple[Callback, ...] = ()) -> dict:
    """Run a recipe end to end and return its metrics (also written to <run folder>/metrics.json).

    `callbacks` plug into the training loop (mmpeft.train.Callback), e.g. a search reporting each epoch's val score.
    """
    conversations = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / RECIPE_FILE).is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no {RECIPE_FILE} there; is it a run folder?")
        if (run_dir / METRICS_FILE).is_file():
            logger.info("run %s is already complete", run_dir)
            return json.loads((run_dir / METRICS_FILE).read_text())
        recipe = load_recipe(run_dir / RECIPE_FILE, overrides)
    else:
        recipe = load_recipe(recipe, overrides)
        if recipe.data.source in CONVERSATION_SOURCES:  # every row checked before a run folder is even made
            conversations = load_conversations(recipe.data, recipe.seed)
        run_dir = new_run_dir(recipe)
    try:
        with run_logging(run_dir), loader_settings(recipe.data.image_cache, recipe.train.num_workers):
            if recipe.data.source in CONVERSATION_SOURCES:  # multi-turn conversations: no labels, their own evaluation
                return execute_conversations(recipe, run_dir, resume is not None, data=conversations)
            return execute(recipe, run_dir, resume=resume is not None, callbacks=callbacks)
    except Exception:
        if resume is None:
            discard_if_nothing_ran(run_dir)
        raise


def execute(recipe: Recipe, run_dir: Path, resume: bool = False, callbacks: tuple[Callback, ...] = ()) -> dict:
    set_seed(recipe.seed, deterministic=False)
    data = load_data(recipe.data, recipe.seed)
    check_same_data(run_dir, data.info, resume)
    write_labels(run_dir, data.labels)
    logger.info("data: %s", ", ".join(f"{k}={v}" for k, v in data.info.get("counts", {}).items()))
    method = METHODS.get(recipe.method.name)()
    if not data.info.get("labelled", True) and method.trains and recipe.train.objective != "contrastive":
        raise DataError(unlabelled_message(data.info, recipe))
    backbone = load_base(recipe)
    check_text_lengths(backbone, data, recipe)
    metrics: dict = {"recipe": recipe.name, "backbone": recipe.backbone.id, "method": recipe.method.name,
                     "seed": recipe.seed, "data": data.info}
    test_sets = evaluation_sets(recipe, data)
    features = bind_features(recipe, backbone)  # image features of the untouched image tower, computed once
    if recipe.eval.zero_shot and recipe.eval.test and method.name != "zero_shot":
        metrics.update(evaluate_all(backbone, test_sets, data, recipe, "zero-shot", features))
    apply_method(backbone, recipe, data.labels)
    metrics["params"] = count_parameters(backbone)
    logger.info("method %s: %d trainable of %d parameters (%.3f%%)", method.name, metrics["params"]["trainable"],
                metrics["params"]["total"], metrics["params"]["percent"])
    features = keep_after_apply(features, recipe, method, backbone)
    trainer = None  # its trackers stay open for the test metrics
    if method.trains:
        metrics["train"], final_state, trainer = train(recipe, run_dir, backbone, data, resume, features, callbacks)
        if final_state is not None:  # FSDP left the trained model sharded: evaluate and save a whole one
            backbone = build(recipe, data.labels, final_state)
        metrics["val"] = {k[4:]: v for k, v in (metrics["train"]["history"] or [{}])[-1].items()
                          if k.startswith("val_")}  # the last epoch's validation scores
    tested = evaluate_all(backbone, test_sets, data, recipe, "test", features) if recipe.eval.test else {
        "test": {"skipped": NOT_TESTED}}
    for key in ("answers", "retrieval"):
        if key in tested:
            tested[key] = {**metrics.get(key, {}), **tested[key]}
    metrics.update(tested)
    metrics["feature_cache"] = features.stats() if features is not None else {"used": False}
    metrics["memory"] = memory_footprint(backbone)
    if "skipped" not in metrics["test"]:
        print_line(method.name, metrics["test"], metrics["params"])
    state = process_state()
    if state.is_main_process:  # one writer, whatever the number of processes
        save_adapter(method, backbone, recipe, run_dir)
        write_run_report(run_dir, metrics, data.labels.names)
        write_json(run_dir / METRICS_FILE, metrics)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        logger.info("run folder: %s", run_dir)
    if trainer is not None:
        end_tracking(trainer, metrics, run_dir)
    state.wait_for_everyone()
    return metrics


def unlabelled_message(info: dict, recipe: Recipe) -> str:
    """Why caption-only data cannot train with a label objective; for a stream, which pass found no label."""
    objective = recipe.train.objective
    if not info.get("stream"):
        return (f"data: {info['where']} is caption-only (no {recipe.data.label_column!r} column), so train.objective: "
                f"{objective!r} has nothing to learn; use train.objective: contrastive, or add a label column")
    found = ("the counting pass found no sample with a label in the training shards" if info["train_length"] ==
             "counted" else "the held-out shards (data.eval_path/val_path) carry no label, and data.samples_per_epoch "
             "skipped the counting pass")
    return (f"data.path: {info['where']} streams caption data: {found} (a .cls member, or a json with a "
            f"{recipe.data.label_column!r} key), so train.objective: {objective!r} has nothing to learn; use "
            "train.objective: contrastive, or label the shards")


def evaluate_all(backbone: Backbone, test_sets: dict, data, recipe: Recipe, stage: str,
                 features: FeatureBinding | None) -> dict:
    """{"zero_shot" or "test": label scores, "answers"/"retrieval": {stage: ...} where the recipe asks for them}."""
    key = "zero_shot" if stage == "zero-shot" else "test"
    if data.info.get("labelled", True):
        found: dict = {key: evaluate_sets(backbone, test_sets, data.labels, recipe, stage, features)}
        if stage == "zero-shot":
            print_line(stage, found[key])
    else:  # caption-only data: no classes to score; retrieval below is the evaluation
        found = {key: {"skipped": NO_LABELS, "n": len(data.test)}}
    if recipe.eval.generate:
        found["answers"] = {key: evaluate_answer_set(backbone, test_sets, data, recipe, stage)}
    if wants_retrieval(recipe):
        found["retrieval"] = {key: evaluate_retrieval_set(backbone, test_sets, data, recipe, stage)}
    return found


def train(recipe: Recipe, run_dir: Path, backbone: Backbone, data, resume: bool,
          features: FeatureBinding | None = None, callbacks: tuple[Callback, ...] = (),
          ) -> tuple[dict, dict | None, Trainer]:
    """Train; returns the summary, under FSDP the whole trained state (else None: `backbone` holds it), and the
    trainer, whose trackers stay open until `end_tracking`."""
    train_set = data.dataset("train", augment=True, seed=recipe.seed, spec=recipe.data)
    if features is not None and data.stream is not None:
        logger.info("feature cache: off for training: the training split is streamed (val and test features stay "
                    "cached)")
    elif features is not None and train_set.augment is not None:
        logger.info("feature cache: off for training: data.augment changes the images every epoch "
                    "(val and test features stay cached)")
    elif features is not None:
        train_set = features.wrap(train_set, "train")
    objective = make_objective(recipe.train.objective, backbone, data.labels, train_set)
    labelled = data.info.get("labelled", True)
    spec = recipe.train if recipe.train.tracking_experiment else replace(recipe.train, tracking_experiment=recipe.name)
    if not labelled and data.val and spec.select_metric != "retrieval":
        logger.info("train.select_metric: %s needs classes; caption-only data selects the best epoch by val "
                    "image->text R@1 (retrieval)", spec.select_metric)
        spec = replace(spec, select_metric="retrieval")
    trainer = Trainer(backbone, objective, train_set, spec, recipe.seed, run_dir,
                      evaluate_val=val_scores(backbone, data, recipe, spec, features) if data.val else None,
                      callbacks=callbacks, tracker_config=_flat(recipe), keep_tracking_open=True)
    try:
        progress = trainer.fit(resume=resume)
    except BaseException:
        end_tracking(trainer, failed=True)
        raise
    seconds = progress.train_seconds
    summary = {"epochs_run": progress.epoch, "steps": progress.global_step, "seconds": round(seconds, 3),
               "samples_per_second": round(progress.samples_seen / seconds, 2) if seconds else None,
               "best_epoch": progress.best_epoch, "history": progress.history}
    if data.stream is not None:
        summary["stream_position"] = progress.stream_position  # at the last checkpoint: shard, offset, count
    return summary, trainer.final_state, trainer


def val_scores(backbone: Backbone, data, recipe: Recipe, spec: TrainSpec,
               features: FeatureBinding | None) -> Callable[[], dict]:
    """The trainer's per-epoch validation: accuracy and macro-F1 of labelled data, plus (caption-only data, or
    train.select_metric: retrieval) "retrieval", the val image->text R@1, and "retrieval_text_to_image"."""
    labelled = data.info.get("labelled", True)
    val_set = data.dataset("val")
    scored = features.wrap(val_set, "val") if features is not None and labelled else val_set

    def evaluate_val() -> dict:
        scores: dict = {}
        if labelled:
            truth, predicted = predict(backbone, scored, data.labels, recipe.eval.batch_size, desc="val")
            found = classification_metrics(truth, predicted, data.labels.names)
            scores.update(accuracy=found["accuracy"], macro_f1=found["macro_f1"])
        if spec.select_metric == "retrieval":
            ranked = evaluate_retrieval(backbone, val_set, data.labels, recipe.eval.batch_size, desc="val retrieval")
            scores.update(retrieval=ranked["image_to_text"]["R@1"],
                          retrieval_text_to_image=ranked["text_to_image"]["R@1"])
        return scores

    return evaluate_val


def memory_footprint(backbone: Backbone) -> dict:
    result = {"weights_bytes": weight_bytes(backbone)}  # includes bitsandbytes' quantization state
    if torch.cuda.is_available():
        result["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return result


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
