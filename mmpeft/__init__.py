"""mmpeft: parameter-efficient fine-tuning workbench for pretrained vision-language models."""

from __future__ import annotations

__version__ = "0.1.0"


def run(recipe, overrides=None, resume=None) -> dict:
    """Run a recipe (path, mapping or Recipe) end to end; returns its metrics. See mmpeft.pipeline.run."""
    from mmpeft.pipeline import run as _run

    return _run(recipe, overrides=overrides, resume=resume)


def load_recipe(source, overrides=None):
    """Load and validate a recipe without running it. See mmpeft.recipe.load_recipe."""
    from mmpeft.recipe import load_recipe as _load

    return _load(source, overrides)


def plan(recipe, overrides: list[str] | dict | None = None, gpu_memory: str | int | None = None) -> list[dict]:
    """Memory of a recipe's training step per method, from configs alone (no weights); fits `gpu_memory`?
    See mmpeft.planner.plan."""
    from mmpeft.planner import plan as _plan

    return _plan(recipe, overrides, gpu_memory=gpu_memory)


def compare(recipe, overrides=None, resume=None) -> dict:
    """Run a methods x seeds grid (a recipe plus `grid:`); returns rows, summary, zero-shot. See mmpeft.comparison."""
    from mmpeft.comparison import compare as _compare

    return _compare(recipe, overrides, resume=resume)


def fewshot(recipe, overrides=None, resume=None) -> dict:
    """Run a methods x shots x seeds grid plus zero-shot baselines. See mmpeft.comparison.fewshot."""
    from mmpeft.comparison import fewshot as _fewshot

    return _fewshot(recipe, overrides, resume=resume)


def continual(recipe, overrides=None, resume=None) -> dict:
    """Run (or resume) a task sequence with a regulariser; returns R and its summaries. See mmpeft.continual."""
    from mmpeft.continual.runner import continual as _continual

    return _continual(recipe, overrides, resume=resume)


def export(run_dir, out, how="auto", dtype=None, verify=True, tolerance=None, onnx=False) -> dict:
    """Export a finished run as a merged model or its adapter, verified. See mmpeft.export.export."""
    from mmpeft.export import export as _export

    return _export(run_dir, out, how=how, dtype=dtype, verify=verify, tolerance=tolerance, onnx=onnx)


def merge(run_dirs, weights=None, how="linear", density=None, out="merged-adapter", seed=0) -> dict:
    """Combine several runs' adapters (linear, TIES, DARE) and evaluate the result. See mmpeft.export.merge."""
    from mmpeft.export import merge as _merge

    return _merge(run_dirs, weights, how=how, density=density, out=out, seed=seed)


__all__ = ["__version__", "compare", "continual", "export", "fewshot", "load_recipe", "merge", "plan", "run"]
