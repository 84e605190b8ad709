"""`mmpeft compare` / `mmpeft fewshot`: a method x seed (x shots) grid over one recipe, in one folder.

<grid>/compare.yaml      the resolved compare recipe (`--resume <grid>` reloads it)
<grid>/cells/<cell>/     an ordinary run folder per cell (recipe.yaml, metrics.json, report.md, adapter/)
<grid>/zero_shot.json    zero-shot baselines: each template, their ensemble, the recipe's prompts
<grid>/icl/              generative fewshot: in-context rows per seed, icl.md and icl_accuracy.png
<grid>/results.csv/.json one row per cell (and per in-context strategy, k and seed);  summary.md, report.md, *.png

A cell whose folder holds metrics.json is finished and skipped when the grid runs again (after an interruption, or
with more seeds or methods); an unfinished cell with a checkpoint continues from it; a failing cell is recorded
with its error and the rest of the grid still runs. Cells run in this process one after another, so image
features of a frozen image tower are computed once for the whole grid (mmpeft.features).

On a generative backbone, `mmpeft fewshot` also runs in-context prompting (mmpeft.evaluation.icl) for every
strategy in grid.strategies (default: all), k in grid.shots plus k = 0, and seed: rows `icl-<strategy>` beside the
trained methods' cells in one table. There k counts demonstrations in the prompt (for trained methods: examples per
class), and k = 0 replaces the dual-encoder template baselines as the zero-shot row. A regularisers grid (a continual
recipe) runs through mmpeft.grids.regularisers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from datetime import datetime
from pathlib import Path

import torch
import yaml

from mmpeft.core.io import write_json, write_text
from mmpeft.core.schema import RecipeError, to_plain
from mmpeft.data import load_data
from mmpeft.evaluation.icl import PLOT_FILE
from mmpeft.evaluation.zero_shot import evaluate_zero_shot, expand_templates
from mmpeft.features import bind_features
from mmpeft.grids.in_context import (
    ICL_COLUMNS,
    ICL_DIR,
    backbone_family,
    icl_outputs,
    icl_rows,
    icl_shots,
    icl_strategies,
    icl_zero_line,
)
from mmpeft.grids.regularisers import RegulariserSetup, run_regulariser_grid
from mmpeft.grids.setup import GRID_RECIPE, Cell, CompareSetup, load_setup, plan_cells, setup_yaml
from mmpeft.report.grid_report import (
    COLUMNS,
    groups_json,
    summarize_grid,
    summary_tables,
    write_grid_report,
    write_plots,
    write_results,
)
from mmpeft.runs.build import load_base
from mmpeft.runs.evaluate import evaluation_sets
from mmpeft.runs.folder import METRICS_FILE, RECIPE_FILE
from mmpeft.runs.single import run
from mmpeft.specs import Recipe

logger = logging.getLogger("mmpeft")

ZERO_SHOT_FILE = "zero_shot.json"
ERROR_FILE = "error.txt"


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
        name = setup.recipe.output.name or f"{setup.recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"
        grid_dir = Path(setup.recipe.output.dir) / name
    grid_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(grid_dir / "compare.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        if isinstance(setup, RegulariserSetup):
            return run_regulariser_grid(setup, grid_dir)
        return run_grid(setup, grid_dir)
    except KeyboardInterrupt:
        logger.warning("interrupted; continue with: mmpeft %s --resume %s", command, grid_dir)
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()


def fewshot(recipe: str | Path | dict | None, overrides: list[str] | dict | None = None,
            resume: str | Path | None = None) -> dict:
    """A compare grid over k = grid.shots (default 1, 2, 4, 8, 16) with the zero-shot baseline; see compare()."""
    return compare(recipe, overrides, resume, command="fewshot")


def run_grid(setup: CompareSetup, grid_dir: Path) -> dict:
    family = backbone_family(setup.recipe)
    strategies = icl_strategies(setup, family)
    cells = plan_cells(setup, grid_dir)
    check_finished_cells(cells)
    write_text(grid_dir / GRID_RECIPE, setup_yaml(setup, grid_dir))
    logger.info("%s grid %s: %d cells (%d methods x %d seeds%s), split seed %d%s", setup.command, grid_dir,
                len(cells), len(setup.methods), len(setup.grid.seeds),
                f" x {len(setup.grid.shots)} shot counts" if setup.grid.shots else "", setup.split_seed,
                f"; in-context prompting: {', '.join(strategies)}" if strategies else "")
    use_templates = setup.recipe.eval.zero_shot and family != "generative"  # generative: in-context k = 0 instead
    zero_shot = zero_shot_baseline(setup, grid_dir) if use_templates else None
    described = {**COLUMNS, **ICL_COLUMNS} if strategies else COLUMNS
    rows: list[dict] = icl_rows(setup, grid_dir, strategies) if strategies else []
    for number, cell in enumerate(cells, start=1):
        row = run_cell(cell)
        rows.append(row)
        write_results(grid_dir, rows, described)
        shown = f"accuracy {row['accuracy']:.4f}" if row["status"] == "ok" else f"FAILED: {row['error']}"
        print(f"[{number}/{len(cells)}] {cell.name}: {shown}", flush=True)
    write_results(grid_dir, rows, described)
    shots = icl_shots(setup) if strategies else list(setup.grid.shots or (setup.recipe.data.shots,))
    groups = summarize_grid(rows, shots, [f"icl-{s}" for s in strategies] + [e.label for e in setup.methods],
                            setup.baseline)
    zero_line = zero_shot["rows"][0]["accuracy"] if zero_shot else icl_zero_line(rows, strategies)
    zero_label = "zero-shot (in-context, k = 0)" if strategies else "zero-shot (recipe prompts)"
    tables = summary_tables(groups, setup.baseline, zero_line, zero_label, in_context=bool(strategies))
    write_text(grid_dir / "summary.md", f"# Summary: {setup.recipe.name}\n\n{tables}")
    plots = write_plots(grid_dir, groups, zero_line, setup.recipe.name, in_context=bool(strategies))
    icl = None
    if strategies:
        icl = icl_outputs(grid_dir, rows, strategies, setup)
        plots.append(f"{ICL_DIR}/{PLOT_FILE}")
    write_grid_report(grid_dir, setup, rows, zero_shot, tables, plots, data_info(grid_dir, zero_shot, rows), icl)
    write_json(grid_dir / "summary.json", groups_json(groups))
    failed = [r for r in rows if r["status"] != "ok"]
    what = "rows" if strategies else "cells"
    print(f"{setup.command}: {len(rows) - len(failed)}/{len(rows)} {what} ok; table and plots in "
          f"{grid_dir / 'report.md'}", flush=True)
    return {"dir": str(grid_dir), "rows": rows, "summary": groups_json(groups), "zero_shot": zero_shot}


def data_info(grid_dir: Path, zero_shot: dict | None, rows: list[dict]) -> dict | None:
    """Facts about the shared split for the report: from the zero-shot baseline, else from a finished cell."""
    if zero_shot:
        return zero_shot["data"]
    for row in rows:
        path = grid_dir / "cells" / row["cell"] / METRICS_FILE
        if row["status"] == "ok" and path.is_file():  # in-context rows have no cell folder
            info = json.loads(path.read_text())["data"]
            if info.get("shots") is not None:  # the cell's train count is its k-shot sample, not the split's
                info = {**info, "counts": {k: v for k, v in info["counts"].items() if k != "train"}}
            return info
    return None


def check_finished_cells(cells: list[Cell]) -> None:
    """A finished cell run with other settings must not be mixed into this grid: refuse before running anything."""
    problems = []
    for cell in cells:
        saved = cell.dir / RECIPE_FILE
        if not (cell.dir / METRICS_FILE).is_file() or not saved.is_file():
            continue
        differences = _differences(yaml.safe_load(saved.read_text()), yaml.safe_load(cell.recipe.to_yaml()))
        if differences:
            problems.append(f"cells/{cell.name} finished with other settings ({'; '.join(differences[:4])})")
    if problems:
        raise RecipeError(problems + ["use another output.name for a new grid, or delete those cell folders"])


def run_cell(cell: Cell) -> dict:
    """Skip a finished cell, continue one with a checkpoint, else run it; a failure becomes a row with its error."""
    metrics_path = cell.dir / METRICS_FILE
    if metrics_path.is_file():
        logger.info("cell %s: finished earlier, skipped", cell.name)
        return cell_row(cell, json.loads(metrics_path.read_text()))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    checkpoint = cell.dir / "checkpoints" / "last" / "progress.json"
    try:
        if checkpoint.is_file() and _same_recipe(cell):
            logger.info("cell %s: continuing from its checkpoint", cell.name)
            metrics = run(None, resume=cell.dir)
        else:
            metrics = run(cell.recipe)
    except Exception as error:  # the grid goes on; the cell keeps its error for the table and the report
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        logger.error("cell %s failed: %s", cell.name, message)
        write_text(cell.dir / ERROR_FILE, traceback.format_exc())
        return {**cell_row(cell, None), "status": "failed", "error": message}
    (cell.dir / ERROR_FILE).unlink(missing_ok=True)
    return cell_row(cell, metrics)


def cell_row(cell: Cell, metrics: dict | None) -> dict:
    """One results row; metrics None (a failed cell) leaves the numbers empty."""
    row = {"cell": cell.name, "method": cell.label, "method_name": cell.recipe.method.name, "seed": cell.seed,
           "shots": cell.shots, "status": "ok", "error": ""}
    if metrics is None:
        return row
    test, params, memory = metrics["test"], metrics.get("params", {}), metrics.get("memory", {})
    train = metrics.get("train") or {}
    fingerprints = metrics.get("data", {}).get("fingerprints", {})
    row.update({
        "accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
        "trainable_params": params.get("trainable"), "total_params": params.get("total"),
        "trainable_percent": params.get("percent"), "train_seconds": train.get("seconds", 0.0),
        "samples_per_second": train.get("samples_per_second"), "weights_bytes": memory.get("weights_bytes"),
        "cuda_peak_bytes": memory.get("cuda_peak_bytes"),
        "feature_cache": metrics.get("feature_cache", {}).get("used", False),
        "train_sample": fingerprints.get("train"), "test_split": fingerprints.get("test"),
        "val_split": fingerprints.get("val"),
    })
    for name, scores in test.get("shifts", {}).items():
        row[f"accuracy[{name}]"] = scores["accuracy"]
    return row


def zero_shot_baseline(setup: CompareSetup, grid_dir: Path) -> dict:
    """Zero-shot accuracy per template, ensemble and recipe prompts on the shared test split; computed once."""
    first: Recipe = plan_cells(setup, grid_dir)[0].recipe  # the shared split; no k-shot sample needed
    recipe = first.replace(data=dataclasses.replace(first.data, shots=None))
    templates = expand_templates(setup.grid.templates, recipe.data.templates)
    key = {"backbone": to_plain(recipe.backbone), "data": to_plain(recipe.data), "templates": templates}
    path = grid_dir / ZERO_SHOT_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved
        logger.info("zero-shot baselines: backbone, data or templates changed since %s; computing them again", path)
    tic = time.perf_counter()
    data = load_data(recipe.data, recipe.seed)
    backbone = load_base(recipe)
    rows = evaluate_zero_shot(backbone, evaluation_sets(recipe, data), data.labels, templates,
                              recipe.eval.batch_size, bind_features(recipe, backbone))
    for row in rows:
        print(f" zero-shot: accuracy {row['accuracy']:.4f}  [{row['prompts']}]", flush=True)
    info = {k: v for k, v in data.info.items() if k not in ("skipped_rows", "class_counts")}
    result = {"rows": rows, "templates": templates, "data": info, "classes": data.labels.names,
              "seconds": round(time.perf_counter() - tic, 3), "key": key}
    write_json(path, result)
    return result


def _same_recipe(cell: Cell) -> bool:
    saved = cell.dir / RECIPE_FILE
    planned = yaml.safe_load(cell.recipe.to_yaml())
    same = saved.is_file() and not _differences(yaml.safe_load(saved.read_text()), planned)
    if not same:
        logger.info("cell %s: its checkpoint was made with other settings; starting it again", cell.name)
    return same


def _differences(old: object, new: object, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in dict.fromkeys([*old, *new]):
            found += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return found
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


__all__ = ["compare", "fewshot"]
