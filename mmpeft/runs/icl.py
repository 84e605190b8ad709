"""`run_icl_sweep`: in-context prompting of a recipe's generative backbone, accuracy vs k per strategy and seed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate.utils import set_seed

from mmpeft.data import load_data
from mmpeft.evaluation.icl import DEFAULT_SHOTS, STRATEGIES, check_strategies, sweep_seed, write_outputs
from mmpeft.runs.build import load_base
from mmpeft.runs.recipe import load_recipe
from mmpeft.specs import Recipe


@torch.no_grad()
def run_icl_sweep(recipe: str | Path | dict | Recipe, shots: Sequence[int] = DEFAULT_SHOTS,
                  strategies: Sequence[str] = STRATEGIES, seeds: Sequence[int] = (0,),
                  out_dir: str | Path | None = None, max_queries: int | None = 200,
                  max_length: int | None = None) -> list[dict]:
    """Accuracy of in-context prompting vs k per strategy and seed: one row per (strategy, k, seed).

    A seed means what `seed` means in a recipe (the split, `data.shots` sample, demonstration draws). Rows carry
    `method` ("icl-<strategy>"), `shots`, `seed`, `accuracy`, `macro_f1`, like compare rows, plus truncation counts.
    With `out_dir`, writes icl.json, icl.md and icl_accuracy.png there. `max_length`: default the model's context.
    """
    check_strategies(strategies)
    if any(k < 0 for k in shots):
        raise ValueError(f"in-context shots must be >= 0, got {list(shots)}")
    recipe = load_recipe(recipe)
    backbone = load_base(recipe)
    backbone.require("generative", "in-context prompting")
    backbone.eval()
    limit = max_length or backbone.context_length
    rows: list[dict] = []
    for seed in seeds:
        set_seed(seed, deterministic=False)
        data = load_data(recipe.data, seed)
        rows += sweep_seed(backbone, data, recipe, seed, shots, strategies, max_queries, limit)
    if out_dir is not None:
        write_outputs(Path(out_dir), rows, recipe.name)
    return rows
