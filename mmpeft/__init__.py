"""mmpeft: parameter-efficient fine-tuning workbench for pretrained vision-language models."""

from __future__ import annotations

from mmpeft.core import VERSION as __version__  # noqa: F401  (re-exported)


def run(recipe, overrides=None, resume=None) -> dict:
    """Run a recipe (path, mapping or Recipe) end to end; returns its metrics. See mmpeft.runs.single.run."""
    from mmpeft.runs.single import run as _run

    return _run(recipe, overrides=overrides, resume=resume)


def load_recipe(source, overrides=None):
    """Load and validate a recipe without running it. See mmpeft.runs.recipe.load_recipe."""
    from mmpeft.runs.recipe import load_recipe as _load

    return _load(source, overrides)


def plan(recipe, overrides: list[str] | dict | None = None, gpu_memory: str | int | None = None) -> list[dict]:
    """Memory of a recipe's training step per method, from configs alone (no weights); fits `gpu_memory`?
    See mmpeft.planner.plan."""
    from mmpeft.planner import plan as _plan

    return _plan(recipe, overrides, gpu_memory=gpu_memory)


def compare(recipe, overrides=None, resume=None) -> dict:
    """Run a methods x seeds grid (a recipe plus `grid:`); returns rows, summary, zero-shot. See mmpeft.grids.runner."""
    from mmpeft.grids.runner import compare as _compare

    return _compare(recipe, overrides, resume=resume)


def fewshot(recipe, overrides=None, resume=None) -> dict:
    """Run a methods x shots x seeds grid plus zero-shot baselines. See mmpeft.grids.runner.fewshot."""
    from mmpeft.grids.runner import fewshot as _fewshot

    return _fewshot(recipe, overrides, resume=resume)


def search(recipe, overrides=None, resume=None) -> dict:
    """Successive-halving search over methods and their settings (a compare recipe plus `search:`, Optuna), then the
    best configurations re-run over grid.seeds as a grid; returns trials, chosen, budget, grid. See
    mmpeft.grids.search."""
    from mmpeft.grids.search import search as _search

    return _search(recipe, overrides, resume=resume)


def continual(recipe, overrides=None, resume=None) -> dict:
    """Run (or resume) a task sequence with a regulariser; returns R and its summaries. See mmpeft.sequences."""
    from mmpeft.sequences.runner import continual as _continual

    return _continual(recipe, overrides, resume=resume)


def export(run_dir, out, how="auto", dtype=None, verify=True, tolerance=None, onnx=False) -> dict:
    """Export a finished run as a merged model or its adapter, verified. See mmpeft.artifacts.export."""
    from mmpeft.artifacts import export as _export

    return _export(run_dir, out, how=how, dtype=dtype, verify=verify, tolerance=tolerance, onnx=onnx)


def merge(run_dirs, weights=None, how="linear", density=None, out="merged-adapter", seed=0) -> dict:
    """Combine several runs' adapters (linear, TIES, DARE) and evaluate the result. See mmpeft.artifacts.merge."""
    from mmpeft.artifacts import merge as _merge

    return _merge(run_dirs, weights, how=how, density=density, out=out, seed=seed)


def predict(source, images, labels=None, top_k=5, question=None, out=None, batch_size=16, base=None) -> list[dict]:
    """Label scores or answers for image files/folders from a run folder or an export. See mmpeft.artifacts.predict."""
    from mmpeft.artifacts.predict import predict as _predict

    return _predict(source, images, labels=labels, top_k=top_k, question=question, out=out, batch_size=batch_size,
                    base=base)


__all__ = ["__version__", "compare", "continual", "export", "fewshot", "load_recipe", "merge", "plan", "predict", "run",
           "search"]
