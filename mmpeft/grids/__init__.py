"""Layer 7: grids of runs over one recipe (methods, shots, regularisers), one folder each.

One kind per file, each registering itself in mmpeft.grids.base.GRID_KINDS (a recipe names it in `grid.kind`); the
cell machinery (mmpeft.grids.cells), the executors and the driver (mmpeft.grids.runner) are shared by all kinds.
"""

import mmpeft.grids.fewshot  # noqa: F401  (registers "fewshot")
import mmpeft.grids.methods  # noqa: F401  (registers "methods")
import mmpeft.grids.regularisers  # noqa: F401  (registers "regularisers")
from mmpeft.grids.base import GRID_KINDS, Cell, GridKind, GridSpec
from mmpeft.grids.loading import load_compare_recipe, load_fewshot_recipe, load_setup, plan_cells

__all__ = ["GRID_KINDS", "Cell", "GridKind", "GridSpec", "load_compare_recipe", "load_fewshot_recipe", "load_setup",
           "plan_cells"]
