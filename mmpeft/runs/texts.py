"""Texts the text tower would cut, found before any training: tokenizers truncate silently, and a class text that
loses its end loses its class name (a long template makes every class the same text, every image the first class)."""

from __future__ import annotations

import logging

from mmpeft.backbones import Backbone
from mmpeft.core.schema import RecipeError, show
from mmpeft.specs import Recipe

logger = logging.getLogger("mmpeft")


def check_text_lengths(backbone: Backbone, data, recipe: Recipe) -> None:
    """Refuse class texts longer than the text tower's limit (RecipeError naming the templates); warn, with the
    count, about captions that will lose their end."""
    labels = data.labels
    class_texts = list(dict.fromkeys(text for i in range(len(labels)) for text in labels.prompts(i)))
    limit, overlong = backbone.overlong_texts(class_texts)
    if overlong:
        text, length = max(overlong, key=lambda item: item[1])
        key = "data.label_prompts" if recipe.data.label_prompts else "data.templates"
        source = "" if recipe.data.label_prompts else f" {', '.join(show(t) for t in recipe.data.templates)}"
        raise RecipeError([f"{key}{source}: {len(overlong)} of {len(class_texts)} class texts are longer than the "
                           f"text tower's limit of {limit} tokens and would be cut at the end, losing the class name; "
                           f"the longest, {show(text)}, has {length} tokens: shorten the template or prompts"])
    captions = list(dict.fromkeys(e.text for split in (data.train, data.val, data.test) for e in split if e.text))
    limit, overlong = backbone.overlong_texts(captions)
    if overlong:
        logger.warning("%d of %d captions (data.text_column: %s) are longer than the text tower's limit of %d tokens: "
                       "their ends are cut (the longest has %d tokens)", len(overlong), len(captions),
                       recipe.data.text_column, limit, max(length for _, length in overlong))
