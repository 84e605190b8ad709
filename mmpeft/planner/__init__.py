"""`mmpeft plan RECIPE`: will this recipe fit on my GPU? Answered before any weight is read.

- model.py: the backbone built from its config on the meta device, the recipe's method applied (the run's own code,
  so parameter counts are the run's), weight bytes at the recipe's dtype or 4/8-bit layout.
- trace.py: the activations one training step keeps for backward, traced on meta tensors.
- budget.py: the arithmetic (peak, reserve, largest batch, suggestions); units.py: '24GiB' <-> bytes.
- render.py: the table the command prints.

This module turns a recipe into those inputs and returns one plain dict per method. (It is a package, not
`mmpeft/plan.py`, because a submodule named `plan` would replace the `mmpeft.plan()` function once imported.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmpeft.methods import count_parameters
from mmpeft.planner.budget import (
    Activations,
    Device,
    Figures,
    Settings,
    estimate,
    largest_batch,
    suggestions,
)
from mmpeft.planner.generative import build_generative_meta, is_generative_config, worst_case
from mmpeft.planner.generative_trace import trace_generative
from mmpeft.planner.model import (
    MetaBackbone,
    PlanError,
    build_meta_backbone,
    load_config,
    trainable_sizes,
    weight_bytes,
)
from mmpeft.planner.render import render
from mmpeft.planner.trace import StepShape, trace_step
from mmpeft.planner.units import format_bytes, parse_memory

if TYPE_CHECKING:
    from mmpeft.data import LabelSet
    from mmpeft.sequences import ContinualRecipe
    from mmpeft.specs import DataSpec, Recipe

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def plan(recipe: str | Path | dict | Recipe, overrides: list[str] | dict | None = None,
         gpu_memory: str | int | None = None) -> list[dict]:
    """One plan per method of the recipe (or of its compare grid): parameters, bytes, verdict, suggestions.

    `gpu_memory` ('24GiB', '80GB', or bytes) is the budget; without it, the first CUDA device's memory, else no
    verdict. Nothing is downloaded and no weights are read.
    """
    budget = parse_memory(gpu_memory) if gpu_memory is not None else _device_memory()
    device = "cuda" if gpu_memory is not None or torch.cuda.is_available() else "cpu"  # where the run would train
    from mmpeft.specs import Recipe

    if not isinstance(recipe, Recipe) and _has_section(recipe, "search"):
        return search_plans(recipe, overrides, budget, device)
    return [plan_recipe(one, label, budget, device) for label, one in plan_targets(recipe, overrides)]


def search_plans(recipe: str | Path | dict, overrides: list[str] | dict | None, budget: int | None,
                 device: Device) -> list[dict]:
    """Per method of a search space, the plan of its hungriest trial (the extremes of every searched key)."""
    from mmpeft.grids.search_space import extreme_recipes, load_search_setup

    plans = []
    for label, recipes in extreme_recipes(load_search_setup(recipe, overrides)):
        planned = [plan_recipe(one, f"{label} (most memory of {len(recipes)} extremes)", budget, device)
                   for one in recipes]
        plans.append(max(planned, key=lambda p: p["bytes"]["total"]))
    return plans


def plan_targets(source: str | Path | dict | Recipe, overrides: list[str] | dict | None = None,
                 ) -> list[tuple[str, Recipe | ContinualRecipe]]:
    """(label, recipe) per method: the recipe's own, or each entry of a compare recipe's `grid.methods` (a
    continual recipe, or a regulariser grid's entries, as sequences)."""
    from mmpeft.runs.recipe import load_recipe
    from mmpeft.sequences import load_continual_recipe
    from mmpeft.specs import Recipe

    if isinstance(source, Recipe):
        return [(source.method.name, source)]
    if not _has_section(source, "grid"):
        if _has_section(source, "tasks"):
            sequence = load_continual_recipe(source, overrides)
            return [(f"{sequence.recipe.method.name} + {sequence.regulariser.name}", sequence)]
        loaded = load_recipe(source, overrides)
        return [(loaded.method.name, loaded)]
    from mmpeft.grids import load_setup
    from mmpeft.grids.base import kind_of

    setup = load_setup(source, overrides)
    return kind_of(setup).trained_recipes(setup)


def plan_recipe(recipe: Recipe | ContinualRecipe, label: str | None = None, budget: int | None = None,
                device: Device = "cuda") -> dict:
    """The plan of one validated recipe as a plain dict (`device`: whose allocator and optimizer the step runs on);
    a sequence's plan is its last task's step, with the regulariser's copies of the trainable parameters."""
    from mmpeft.methods import METHODS
    from mmpeft.sequences import ContinualRecipe

    copies, held = 0, ""
    if isinstance(recipe, ContinualRecipe):
        copies, held = regulariser_state(recipe)
        recipe = recipe.recipe
    method = METHODS.get(recipe.method.name)
    meta = meta_backbone(recipe)
    train, quant = recipe.train, recipe.backbone.quantization
    autocast = AUTOCAST.get(train.mixed_precision)
    if meta.backbone.family == "generative":
        activations, per_example, step = generative_step(meta, recipe, autocast)
    else:
        shape = step_shape(meta, recipe, train.batch_size)
        traces = [trace_step(meta, s, autocast) for s in (shape, dataclasses.replace(
            shape, batch=shape.batch + 1, text_rows=shape.text_rows + int(shape.contrastive)))]
        activations, per_example = Activations(shape.batch, *traces), shape.channels * shape.image_size ** 2 * 4
        step = {"image_size": shape.image_size, "image_tokens": image_tokens(meta), "text_rows": shape.text_rows,
                "text_length": shape.text_length, "notes": plan_notes(recipe, meta)}
    weights: dict[int | None, int] = {None: weight_bytes(meta, None, method.trains)}
    for bits in (4, 8):
        weights[bits] = weight_bytes(meta, _quantization(quant, bits), method.trains)
    figures = Figures(weights, trainable_sizes(meta.backbone) if method.trains else [], activations, per_example,
                      device, copies)
    settings = Settings(train.batch_size, train.gradient_checkpointing, quant.bits if quant else None, train.optimizer)
    current = estimate(figures, settings)
    counts = count_parameters(meta.backbone)  # the same count a run reports
    total, trainable = counts["total"], counts["trainable"]
    result: dict[str, Any] = {
        "label": label or recipe.method.name, "method": recipe.method.name, "backbone": recipe.backbone.id,
        "model": type(meta.backbone.base_model).__name__, "dtype": recipe.backbone.dtype,
        "quantization": settings.bits, "counted_by": meta.counted_by, "trains": method.trains,
        "total_params": total, "trainable_params": trainable,
        "batch_size": train.batch_size, **{k: v for k, v in step.items() if k != "notes"},
        "objective": train.objective,
        "gradient_checkpointing": settings.checkpointing, "optimizer": train.optimizer,
        "mixed_precision": train.mixed_precision, "device": device,
        "bytes": dataclasses.asdict(current), "regulariser_state": held,
        "activations_by_checkpointing": {False: figures.activations.kept(settings.batch, False),
                                         True: figures.activations.kept(settings.batch, True)},
        "budget": budget, "fits": None if budget is None else current.total <= budget,
        "max_batch": None, "suggestions": [],
        "notes": list(meta.notes) + step["notes"],
    }
    if budget is not None and method.trains:
        result["max_batch"] = largest_batch(figures, settings, budget)
        if not result["fits"]:
            result["suggestions"] = suggestions(figures, settings, budget, method.quantized_bits)
    return result


def meta_backbone(recipe: Recipe) -> MetaBackbone:
    """The recipe's backbone on the meta device with its method applied: a generative VLM or a dual encoder."""
    path, config = load_config(recipe.backbone)
    if is_generative_config(recipe.backbone, config):
        return build_generative_meta(recipe, plan_labels(recipe.data), path, config)
    return build_meta_backbone(recipe, plan_labels(recipe.data))


def generative_step(meta: MetaBackbone, recipe: Recipe, autocast: torch.dtype | None) -> tuple[Activations, int, dict]:
    """A generative step's activations (traced at the worst-case example), bytes per example, and plan fields."""
    case = worst_case(meta, recipe)
    batch = recipe.train.batch_size
    traced = trace_generative(meta, case, batch, autocast)
    step = {"image_size": case.image_edge, "image_tokens": case.image_tokens, "images_per_example": case.images,
            "sequence_length": case.length, "text_rows": batch, "text_length": case.length,
            "notes": case.notes + traced.notes + plan_notes(recipe, meta)}
    return Activations(batch, traced.at, traced.next), traced.per_example, step


def regulariser_state(sequence: ContinualRecipe) -> tuple[int, str]:
    """Copies of the trainable parameters the sequence's regulariser holds at its last task, and what they are."""
    from mmpeft.sequences.regularisers import REGULARISERS

    config = sequence.regulariser
    copies, what = REGULARISERS.get(config.name).state_copies(config, len(sequence.tasks))
    return copies, f"{config.name}: {what}, {copies} x the trainable parameters"


def plan_labels(spec: DataSpec) -> LabelSet:
    """The label set without opening an image: `data.classes`, or the labels of the rows (folder names, columns)."""
    from mmpeft.data import DataError, LabelSet, read_rows
    from mmpeft.data.conversation_data import CONVERSATION_SOURCES

    if spec.source in CONVERSATION_SOURCES:
        return LabelSet([])  # conversations have no labels, as a run's
    if spec.classes is not None:
        return LabelSet.from_spec(spec, spec.classes)
    raw = read_rows(spec)
    found = [row.label for row in raw.rows if row.label is not None]
    if not found:
        raise DataError(f"no labelled rows found in {raw.where} (data.source: {spec.source})")
    return LabelSet.from_spec(spec, found, raw.label_names)


def step_shape(meta: MetaBackbone, recipe: Recipe, batch: int) -> StepShape:
    """Image size from the vision config; text rows and length from the class prompts, tokenized when possible."""
    vision = meta.backbone.tower_model("vision").config
    prompts = [text for i in range(len(meta.labels)) for text in meta.labels.prompts(i)]
    length = meta.backbone.base_model.config.text_config.max_position_embeddings
    if meta.tokenizer is not None:
        length = int(meta.backbone.tokenize(prompts)["input_ids"].shape[1])
    contrastive = recipe.train.objective == "contrastive"
    return StepShape(batch=batch, image_size=vision.image_size, channels=getattr(vision, "num_channels", 3),
                     text_rows=batch if contrastive else len(prompts), text_length=length, contrastive=contrastive)


def image_tokens(meta: MetaBackbone) -> int:
    vision = meta.backbone.tower_model("vision")
    patches = (vision.config.image_size // vision.config.patch_size) ** 2
    return patches + (1 if hasattr(vision.embeddings, "class_embedding") else 0)


def plan_notes(recipe: Recipe, meta: MetaBackbone) -> list[str]:
    notes = []
    if meta.tokenizer is None:
        notes.append("no tokenizer files found: text length taken as the text tower's maximum")
    if recipe.train.objective == "contrastive":
        notes.append("contrastive: one caption per example, assumed as long as the longest class prompt")
    if recipe.train.strategy == "fsdp":
        notes.append("train.strategy fsdp shards weights, gradients and optimizer state across processes: this "
                     "one-process plan is an upper bound per GPU")
    return notes


def _quantization(spec: Any, bits: int) -> Any:
    from mmpeft.specs import QuantizationSpec

    return dataclasses.replace(spec, bits=bits) if spec is not None else QuantizationSpec(bits=bits)


def _has_section(source: Any, section: str) -> bool:
    if isinstance(source, dict):
        return section in source
    path = Path(source)
    if not path.is_file():
        return False
    from mmpeft.runs.recipe import read_yaml

    return section in read_yaml(path)  # a RecipeError names the file


def _device_memory() -> int | None:
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


__all__ = ["PlanError", "estimate", "format_bytes", "parse_memory", "plan", "plan_recipe", "plan_targets", "render"]
