"""Zero-shot baselines: the untouched backbone under each prompt template alone, under their ensemble, and under the
recipe's own prompts.

Why several: zero-shot accuracy swings with wording, so a fine-tuned number is read against the spread. The ensemble
averages each class's text embeddings over the templates (what `DualEncoder.class_text_features` does with several
prompts per class); the recipe's prompts are what every trained cell starts from, including per-class synonyms or
descriptions from `data.label_prompts`. Images are encoded once and scored against every prompt set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from mmpeft.data import LabelSet
from mmpeft.evaluation.metrics import classification_metrics
from mmpeft.features import encode_dataset

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import ImageDataset
    from mmpeft.features import FeatureBinding

# Built-in template sets, usable by name in `grid.templates`. Words stay within the demo backbones' vocabulary.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of a {label}.", "a picture of a {label}.", "an image of a {label}.",
              "a drawing of a {label}.", "a photo of the {label}."),
    "digits": ("a photo of the digit {label}.", "a handwritten {label}.", "a scan of the number {label}.",
               "an image of a {label}."),
}
RECIPE_PROMPTS = "recipe prompts"
ENSEMBLE = "ensemble"


def expand_templates(entries: Sequence[str], default: Sequence[str]) -> list[str]:
    """Template strings and set names -> distinct templates in order; no entries: `default` (data.templates)."""
    templates: list[str] = []
    for entry in entries or default:
        for template in TEMPLATE_SETS.get(entry, (entry,)):
            if template not in templates:
                templates.append(template)
    return templates


def prompt_sets(labels: LabelSet, templates: Sequence[str]) -> list[tuple[str, str, LabelSet]]:
    """(kind, description, label set) per prompt set; a set with the same prompts as an earlier one is dropped."""
    names = dict(zip(labels.keys, labels.names))
    sets = [("recipe", RECIPE_PROMPTS, labels)]
    sets += [("template", template, LabelSet(labels.keys, names, None, [template])) for template in templates]
    if len(templates) > 1:
        sets.append(("ensemble", f"{ENSEMBLE} of {len(templates)} templates", LabelSet(labels.keys, names, None,
                                                                                        templates)))
    seen: list[list[list[str]]] = []
    unique: list[tuple[str, str, LabelSet]] = []
    for kind, description, label_set in sets:
        prompts = [label_set.prompts(i) for i in range(len(label_set))]
        if prompts in seen:  # say so on the row that already scores these prompts
            index = seen.index(prompts)
            earlier_kind, earlier, earlier_set = unique[index]
            unique[index] = (earlier_kind, f"{earlier} = {description}", earlier_set)
            continue
        seen.append(prompts)
        unique.append((kind, description, label_set))
    return unique


@torch.no_grad()
def evaluate_zero_shot(backbone: Backbone, sets: dict[str, ImageDataset], labels: LabelSet, templates: Sequence[str],
                       batch_size: int = 64, features: FeatureBinding | None = None) -> list[dict]:
    """One row per prompt set: {"kind", "prompts", "accuracy", "macro_f1", "shifts": {set name: accuracy}}.

    `sets` are the test split under the recipe's shift first, then any eval shifts; the row's accuracy is the
    first one's. With a feature binding, the images' features come from (and go to) the cache.
    """
    was_training = backbone.training
    backbone.eval()
    encoded = {}
    for name, dataset in sets.items():
        wrapped = features.wrap(dataset, f"zero-shot [{name}]") if features is not None else dataset
        image_features = getattr(wrapped, "features", None)
        if image_features is None:
            image_features = encode_dataset(backbone, dataset, batch_size, desc=f"zero-shot [{name}]")
        encoded[name] = (image_features, np.asarray(dataset.labels))
    rows = []
    for kind, description, label_set in prompt_sets(labels, templates):
        text_features = backbone.class_text_features(label_set)
        scores = {}
        for name, (image_features, truth) in encoded.items():
            predicted = backbone.score(image_features, text_features).argmax(-1).cpu().numpy()
            scores[name] = classification_metrics(truth, predicted, labels.names)
        main = next(iter(scores.values()))
        rows.append({"kind": kind, "prompts": description, "accuracy": main["accuracy"],
                     "macro_f1": main["macro_f1"], "shifts": {n: s["accuracy"] for n, s in scores.items()}})
    backbone.train(was_training)
    return rows
