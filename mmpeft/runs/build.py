"""The one build path: a recipe (+ label set, + trained state) -> a placed, configured backbone with its method.

Every command that needs a model (run, the rebuild after FSDP, export, continual, in-context sweeps, grids) calls
`build`, or its two halves when something must happen in between (a run measures zero-shot accuracy on the
untouched backbone before the method is applied). Seeding happens here, so a rebuilt model is the one the run made.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from accelerate.utils import set_seed

from mmpeft.backbones import Backbone, load_backbone
from mmpeft.core.distributed import process_state
from mmpeft.methods import METHODS
from mmpeft.methods.base import load_trainable_state

if TYPE_CHECKING:
    from mmpeft.data import LabelSet
    from mmpeft.specs import Recipe


def load_base(recipe: Recipe) -> Backbone:
    """The untouched backbone: seeded (`backbone.init: scratch` draws its weights from the seed), on accelerate's
    device (quantized weights were placed when loaded) and configured from the recipe."""
    set_seed(recipe.seed, deterministic=False)
    backbone = load_backbone(recipe.backbone)
    if recipe.backbone.quantization is None:
        backbone.to(process_state().device)
    backbone.configure(recipe)
    return backbone


def apply_method(backbone: Backbone, recipe: Recipe, labels: LabelSet, state: dict | Path | None = None) -> Backbone:
    """The recipe's method applied with a seeded init (independent of what ran before it), then the trained state
    loaded: a dict of trainable tensors (gathered from a sharded run) or the folder the method saved."""
    method = METHODS.get(recipe.method.name)()
    set_seed(recipe.seed, deterministic=False)
    method.apply(backbone, recipe.method, labels)
    if isinstance(state, dict):
        load_trainable_state(backbone, state)
    elif state is not None:
        method.load(backbone, recipe.method, Path(state))
    return backbone


def build(recipe: Recipe, labels: LabelSet, state: dict | Path | None = None) -> Backbone:
    """`load_base` then `apply_method`: the model a recipe trains (or, with `state`, the model it trained)."""
    return apply_method(load_base(recipe), recipe, labels, state)
