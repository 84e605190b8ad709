"""`grid.kind: fewshot` (`mmpeft fewshot`): methods x shots x seeds, grid.shots defaulting to 1, 2, 4, 8, 16.

Cells, rows and the zero-shot baselines are those of a methods grid (mmpeft.grids.methods). On a generative
backbone it also runs in-context prompting (mmpeft.grids.in_context) for every strategy in grid.strategies (default:
all), k in grid.shots plus k = 0, and seed: rows `icl-<strategy>` beside the trained methods' cells in one table.
There k counts demonstrations in the prompt (for trained methods: examples per class), and k = 0 replaces the
dual-encoder template baselines as the zero-shot row. The in-context rows run in the driver, before the cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from mmpeft.grids.base import GRID_KINDS
from mmpeft.grids.in_context import (
    ICL_COLUMNS,
    ICL_DIR,
    icl_outputs,
    icl_rows,
    icl_shots,
    icl_strategies,
    icl_zero_line,
)
from mmpeft.grids.method_setup import CompareSetup
from mmpeft.grids.methods import MethodsKind


@GRID_KINDS.register("fewshot")
class FewshotKind(MethodsKind):
    name: ClassVar[str] = "fewshot"
    commands: ClassVar[tuple[str, ...]] = ("compare", "fewshot")

    def strategies(self, setup: CompareSetup, family: str) -> tuple[str, ...]:
        return icl_strategies(setup, family)

    def in_context_rows(self, setup: CompareSetup, grid_dir: Path, strategies: tuple[str, ...]) -> list[dict]:
        return icl_rows(setup, grid_dir, strategies)

    def columns(self, setup: CompareSetup, context: dict) -> dict[str, str]:
        described = super().columns(setup, context)
        return {**described, **ICL_COLUMNS} if context["strategies"] else described

    def summary_shots(self, setup: CompareSetup, strategies: tuple[str, ...]) -> list[int | None]:
        return icl_shots(setup) if strategies else super().summary_shots(setup, strategies)

    def zero_line(self, rows: list[dict], strategies: tuple[str, ...]) -> float | None:
        return icl_zero_line(rows, strategies)

    def in_context_outputs(self, setup: CompareSetup, grid_dir: Path, rows: list[dict], strategies: tuple[str, ...],
                           plots: list[str]) -> dict | None:
        from mmpeft.evaluation.icl import PLOT_FILE

        if not strategies:
            return None
        plots.append(f"{ICL_DIR}/{PLOT_FILE}")
        return icl_outputs(grid_dir, rows, strategies, setup)
