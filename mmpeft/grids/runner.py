"""`mmpeft compare` / `mmpeft fewshot`: run every cell of a grid recipe (any kind) into one folder.

The driver (this process) plans the cells, refuses finished cells made with other settings, saves the resolved
recipe (<grid>/compare.yaml: `--resume <grid>` reloads it), runs what comes before the cells (baselines,
in-context rows), hands the cells to grid.executor and writes results.csv/json as each one ends; summary, plots and
report.md are written once, at the end, by the kind (mmpeft.grids.base.GridKind).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from mmpeft.core.io import make_output_dir, write_text
from mmpeft.grids.base import GRID_RECIPE, Cell, GridKind, GridSpec, kind_of
from mmpeft.grids.cells import check_finished_cells, write_rows
from mmpeft.grids.executors import Executor, ProcessExecutor, SequentialExecutor
from mmpeft.grids.loading import load_setup
from mmpeft.runs.folder import claim_run_dir, log_to, release_run_dir

logger = logging.getLogger("mmpeft")


def compare(recipe: str | Path | dict | None, overrides: list[str] | dict | None = None,
            resume: str | Path | None = None, command: str = "compare") -> dict:
    """Run every cell of a compare recipe (or continue the grid folder `resume`); returns rows, summary, zero-shot.

    The same recipe with the same `output.name` continues that grid too: finished cells are skipped.
    """
    if resume is not None:
        grid_dir = Path(resume)
        if not (grid_dir / GRID_RECIPE).is_file():
            raise FileNotFoundError(f"--resume {grid_dir}: no {GRID_RECIPE} there; is it a compare grid folder?")
        setup = load_setup(grid_dir / GRID_RECIPE, overrides, command)
    else:
        setup = load_setup(recipe, overrides, command)
        shared = setup.recipe.recipe if setup.grid.kind == "regularisers" else setup.recipe
        name = shared.output.name or f"{setup.recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"
        grid_dir = Path(shared.output.dir) / name
    make_output_dir(grid_dir, "grid folder")
    with claimed(grid_dir, command), log_to(grid_dir / "compare.log"):
        try:
            return run_grid(setup, grid_dir)
        except KeyboardInterrupt:
            logger.warning("interrupted; continue with: mmpeft %s --resume %s", command, grid_dir)
            raise


@contextmanager
def claimed(grid_dir: Path, command: str) -> Iterator[None]:
    """Hold the grid folder's lock while this driver runs (the OS drops it if the process dies): a second driver
    on the same folder (`mmpeft compare/search` with the same output.name, or a `--resume`) is refused, not mixed in."""
    claim_run_dir(grid_dir, "grid folder", f"`mmpeft {command}`")
    try:
        yield
    finally:
        release_run_dir(grid_dir)


def fewshot(recipe: str | Path | dict | None, overrides: list[str] | dict | None = None,
            resume: str | Path | None = None) -> dict:
    """A fewshot grid over k = grid.shots (default 1, 2, 4, 8, 16) with the zero-shot baseline; see compare()."""
    return compare(recipe, overrides, resume, command="fewshot")


def run_grid(setup, grid_dir: Path) -> dict:
    """Checks, the rows before the cells, every cell through the executor, then the kind's report."""
    kind = kind_of(setup)
    context = kind.check(setup)  # may refuse settings that need the backbone: before anything is written
    cells = kind.plan_cells(setup, grid_dir)
    check_finished_cells(kind, cells)
    with make_executor(setup.grid, kind, grid_dir) as executor:
        executor.start(cells)  # worker processes load while the driver runs the baselines
        # saved once the executor is up: a resume whose executor cannot start (no Ray cluster at grid.ray_address)
        # leaves the folder's recipe as it was, so a plain --resume still works
        write_text(grid_dir / GRID_RECIPE, kind.setup_yaml(setup, grid_dir))
        context = kind.begin(setup, grid_dir, context)
        rows = run_cells(executor, kind, setup, grid_dir, cells, context)
    return kind.write_report(setup, grid_dir, cells, rows, context)


def run_cells(executor: Executor, kind: GridKind, setup, grid_dir: Path, cells: list[Cell],
              context: dict) -> list[dict]:
    """Every cell through the executor; results.csv/json rewritten (in plan order) as each cell ends."""
    before, columns = list(context.get("rows", [])), kind.columns(setup, context)
    done: dict[str, dict] = {}

    def finished(cell: Cell, row: dict) -> None:
        done[cell.name] = row
        write_rows(grid_dir, before, cells, done, columns)

    executor.run(cells, finished)
    return write_rows(grid_dir, before, cells, done, columns)


def make_executor(grid: GridSpec, kind: GridKind, grid_dir: Path) -> Executor:
    """The executor grid.executor names (validated, Ray's presence included, when the recipe was loaded)."""
    if grid.executor == "processes":
        return ProcessExecutor(grid, kind, grid_dir)
    if grid.executor == "ray":
        from mmpeft.grids.ray_executor import RayExecutor

        return RayExecutor(grid, kind, grid_dir)
    return SequentialExecutor(grid, kind, grid_dir)
