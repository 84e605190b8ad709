"""The cell machinery every grid kind shares, written once.

A cell whose folder holds metrics.json is finished and skipped when the grid runs again (after an interruption, or
with more seeds or entries); an unfinished cell with a checkpoint continues from it; a failing cell is recorded
(error.txt in its folder, a `failed` row with the first line of its error) and the rest of the grid still runs;
failed and unfinished cells run again on the next run (`--resume`). A finished cell made with other settings is
refused before anything runs, so one table never mixes budgets. results.csv/json are rewritten as each cell ends,
in plan order, by the driver only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import traceback
from pathlib import Path

import yaml

from mmpeft.core.io import write_text
from mmpeft.core.schema import RecipeError
from mmpeft.grids.base import Cell, GridKind, differences
from mmpeft.runs.folder import METRICS_FILE, RECIPE_FILE

logger = logging.getLogger("mmpeft")

ERROR_FILE = "error.txt"


def check_finished_cells(kind: GridKind, cells: list[Cell]) -> None:
    """A cell made with other settings must not be mixed into this grid: refuse before running anything."""
    problems = []
    for cell in cells:
        finished = (cell.dir / METRICS_FILE).is_file()
        if not (cell.dir / RECIPE_FILE).is_file() or not (finished or kind.refuse_started_cells):
            continue
        changed = setting_differences(kind, cell)
        if changed:
            what = "finished" if not kind.refuse_started_cells else "was run"
            problems.append(f"cells/{cell.name} {what} with other settings ({'; '.join(changed[:4])})")
    if problems:
        raise RecipeError(problems + ["use another output.name for a new grid, or delete those cell folders"])


def setting_differences(kind: GridKind, cell: Cell) -> list[str]:
    """How the cell's saved recipe.yaml differs from the one planned now (the kind's ignored keys left out)."""
    old = yaml.safe_load((cell.dir / RECIPE_FILE).read_text()) or {}
    new = yaml.safe_load(cell.recipe.to_yaml())
    for key in kind.ignored_settings:
        old.pop(key, None)
        new.pop(key, None)
    drop_added_defaults(old, new, cell.recipe)
    return differences(old, new)


def drop_added_defaults(old: dict, new: dict, spec: object) -> None:
    """A key a later mmpeft added (absent from a cell saved before it) at its default value changes nothing."""
    if not dataclasses.is_dataclass(spec):
        return
    defaults = {f.name: f for f in dataclasses.fields(spec)}
    for key in list(new):
        if key not in old and key in defaults and getattr(spec, key) == field_default(defaults[key]):
            new.pop(key)
        elif isinstance(old.get(key), dict) and isinstance(new[key], dict):
            drop_added_defaults(old[key], new[key], getattr(spec, key, None))


def field_default(field: dataclasses.Field) -> object:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def run_cell(kind: GridKind, cell: Cell) -> dict:
    """Skip a finished cell, continue one with a checkpoint, else run it; a failure becomes a row with its error.

    Runs wherever the executor puts it (this process, a pool worker, a Ray task): it reads and writes only cell.dir.
    """
    metrics_path = cell.dir / METRICS_FILE
    if metrics_path.is_file():
        logger.info("cell %s: finished earlier, skipped", cell.name)
        return kind.cell_row(cell, json.loads(metrics_path.read_text()))
    _reset_cuda_peak()
    checkpoint = kind.checkpoint(cell)
    resume = checkpoint is not None and checkpoint.is_file() and _same_settings(kind, cell)
    if resume:
        logger.info("cell %s: continuing from its checkpoint", cell.name)
    try:
        metrics = kind.execute(cell, resume)
    except Exception as error:  # the grid goes on; the cell keeps its error for the table and the report
        return failed_row(kind, cell, error_message(error), traceback.format_exc())
    (cell.dir / ERROR_FILE).unlink(missing_ok=True)
    return kind.cell_row(cell, metrics)


def failed_row(kind: GridKind, cell: Cell, message: str, details: str) -> dict:
    """Record a failed cell: error.txt in its folder, and a row with the numbers left empty."""
    logger.error("cell %s failed: %s", cell.name, message)
    write_text(cell.dir / ERROR_FILE, details if details.endswith("\n") else details + "\n")
    return {**kind.cell_row(cell, None), "status": "failed", "error": message}


def error_message(error: BaseException) -> str:
    """`Type: first line of the message`: what the results table shows of an error."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def write_rows(grid_dir: Path, before: list[dict], cells: list[Cell], done: dict[str, dict],
               columns: dict[str, str]) -> list[dict]:
    """results.csv/json from the rows so far, in plan order whatever order the cells finished in."""
    from mmpeft.report.grid_report import write_results

    rows = before + [done[cell.name] for cell in cells if cell.name in done]
    write_results(grid_dir, rows, columns)
    return rows


def _same_settings(kind: GridKind, cell: Cell) -> bool:
    same = (cell.dir / RECIPE_FILE).is_file() and not setting_differences(kind, cell)
    if not same:
        logger.info("cell %s: its checkpoint was made with other settings; starting it again", cell.name)
    return same


def _reset_cuda_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
