"""Evaluation as a run reports it: the test split under every shift, retrieval and answers, one printed line each."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmpeft.core.distributed import process_state
from mmpeft.data import ImageDataset, parse_shift, shift_label
from mmpeft.evaluation import classification_metrics, predict
from mmpeft.evaluation.answers import evaluate_answers
from mmpeft.evaluation.retrieval import evaluate_retrieval

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import LabelSet
    from mmpeft.features import FeatureBinding
    from mmpeft.specs import Recipe


def evaluation_sets(recipe: Recipe, data) -> dict[str, ImageDataset]:
    """The test split under the recipe's shift, plus one entry per `data.eval_shifts`."""
    sets = {shift_label(data.shifts): data.dataset("test")}
    for spec in recipe.data.eval_shifts:
        sets.setdefault(spec, ImageDataset(data.test, shifts=parse_shift(spec)))
    return sets


def evaluate_sets(backbone: Backbone, sets: dict[str, ImageDataset], labels: LabelSet, recipe: Recipe, desc: str,
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


def evaluate_retrieval_set(backbone: Backbone, sets: dict[str, ImageDataset], data, recipe: Recipe, desc: str) -> dict:
    """Retrieval on the test split under the recipe's own shift (the first of `sets`), printed in one line."""
    name, dataset = next(iter(sets.items()))
    result = evaluate_retrieval(backbone, dataset, data.labels, recipe.eval.batch_size, desc=f"{desc} retrieval")
    result["shift"] = name
    i2t, t2i = result["image_to_text"], result["text_to_image"]
    print(f"{desc:>10}: retrieval [{name}] image->text R@1 {i2t['R@1']:.3f} R@5 {i2t['R@5']:.3f}  "
          f"text->image R@1 {t2i['R@1']:.3f} R@5 {t2i['R@5']:.3f}", flush=True)
    return result


def evaluate_answer_set(backbone: Backbone, sets: dict[str, ImageDataset], data, recipe: Recipe, desc: str) -> dict:
    """Free-form answers (generative backbones) on the test split under the recipe's own shift, printed."""
    result = evaluate_answers(backbone, next(iter(sets.values())), data.labels, recipe.eval.batch_size,
                              desc=f"{desc} answers")
    if process_state().is_main_process:
        print(f"{desc:>10}: answers exact match {result['exact_match']:.3f}  normalised match "
              f"{result['normalized_match']:.3f}  token-F1 {result['token_f1']:.3f}", flush=True)
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
