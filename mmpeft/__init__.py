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


__all__ = ["__version__", "load_recipe", "run"]
