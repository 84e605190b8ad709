"""Where a grid's cells run: in this process, one after another (image features of a frozen tower are shared).

Every executor runs the same function on the same Cell (mmpeft.grids.cells.run_cell): a cell's seed, split and
k-shot sample come from its recipe, never from the worker or the order. The driver alone writes results, summary
and report.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from mmpeft.grids.base import Cell, GridKind, GridSpec
from mmpeft.grids.cells import run_cell
from mmpeft.runs.folder import METRICS_FILE

logger = logging.getLogger("mmpeft")

Finished = Callable[[Cell, dict], None]


class Progress:
    """A bar counting finished / running / failed cells, and one printed line per finished cell."""

    def __init__(self, kind: GridKind, total: int):
        from tqdm.auto import tqdm

        self.kind, self.total, self.running, self.failed, self.number = kind, total, 0, 0, 0
        self.bar = tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True, leave=False)

    def started(self) -> None:
        self.running += 1
        self.bar.set_postfix(running=self.running, failed=self.failed)

    def ended(self, cell: Cell, row: dict, was_running: bool = True) -> None:
        self.running -= int(was_running)
        self.number += 1
        ok = row["status"] == "ok"
        self.failed += int(not ok)
        self.bar.update(1)
        self.bar.set_postfix(running=self.running, failed=self.failed)
        shown = self.kind.shown(row) if ok else f"FAILED: {row['error']}"
        self.bar.write(f"[{self.number}/{self.total}] {cell.name}: {shown}", file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


class Executor:
    """Runs cells, calling `finished(cell, row)` in the driver as each ends; a context manager for its workers."""

    def __init__(self, grid: GridSpec, kind: GridKind, grid_dir: Path):
        self.grid, self.kind, self.grid_dir = grid, kind, grid_dir

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def run(self, cells: list[Cell], finished: Finished) -> None:
        progress = Progress(self.kind, len(cells))
        try:
            todo = []
            for cell in cells:
                if (cell.dir / METRICS_FILE).is_file():  # finished earlier: its row comes from its folder, here
                    self._end(progress, finished, cell, run_cell(self.kind, cell), was_running=False)
                else:
                    todo.append(cell)
            if todo:
                self.run_todo(todo, progress, finished)
        finally:
            progress.close()

    def run_todo(self, cells: list[Cell], progress: Progress, finished: Finished) -> None:
        for cell in cells:
            progress.started()
            self._end(progress, finished, cell, run_cell(self.kind, cell))

    @staticmethod
    def _end(progress: Progress, finished: Finished, cell: Cell, row: dict, was_running: bool = True) -> None:
        finished(cell, row)
        progress.ended(cell, row, was_running)


class SequentialExecutor(Executor):
    """In this process, one cell after another (the default)."""


def make_executor(grid: GridSpec, kind: GridKind, grid_dir: Path) -> Executor:
    """The executor grid.executor names."""
    return SequentialExecutor(grid, kind, grid_dir)


__all__ = ["Executor", "SequentialExecutor", "make_executor"]
