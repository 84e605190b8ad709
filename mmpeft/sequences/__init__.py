"""Continual learning: a task sequence on one backbone + method, a regulariser, and the forgetting matrix.

`continual(recipe)` runs a sequence (also `mmpeft continual RECIPE`); `run_continual_cell` is one cell of a
`regularisers x seeds` comparison grid; `load_continual_recipe` validates a recipe without running it.
"""

from __future__ import annotations

from pathlib import Path

from mmpeft.sequences.tasks import ContinualRecipe, Task, load_continual_recipe


def continual(recipe: str | Path | dict | ContinualRecipe | None, overrides: list[str] | dict | None = None,
              resume: str | Path | None = None) -> dict:
    """Run (or resume) a continual recipe; see mmpeft.sequences.runner.continual."""
    from mmpeft.sequences.runner import continual as _continual

    return _continual(recipe, overrides, resume)


def run_continual_cell(recipe: str | Path | dict | ContinualRecipe, regulariser_name: str | dict, seed: int,
                       overrides: list[str] | dict | None = None, output_dir: str | Path | None = None) -> dict:
    """One regulariser x seed cell as a flat row; see mmpeft.sequences.runner.run_continual_cell."""
    from mmpeft.sequences.runner import run_continual_cell as _cell

    return _cell(recipe, regulariser_name, seed, overrides=overrides, output_dir=output_dir)


__all__ = ["ContinualRecipe", "Task", "continual", "load_continual_recipe", "run_continual_cell"]

