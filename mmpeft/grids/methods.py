"""`grid.kind: methods` (`mmpeft compare`): methods x seeds [x shots] over one recipe, one run folder per cell.

<grid>/compare.yaml      the resolved compare recipe (`--resume <grid>` reloads it)
<grid>/cells/<cell>/     an ordinary run folder per cell (recipe.yaml, metrics.json, report.md, adapter/)
<grid>/zero_shot.json    zero-shot baselines: each template, their ensemble, the recipe's prompts
<grid>/results.csv/.json one row per cell;  summary.md, report.md, *.png

The zero-shot baselines are computed once, by the driver, on the split every cell shares. Run in one process
(grid.executor: sequential), the image features of a frozen image tower are computed once for the whole grid
(mmpeft.features); with the other executors the workers of one machine share them through its cache folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

from mmpeft.core.io import write_json, write_text
from mmpeft.core.schema import RecipeError, to_plain
from mmpeft.grids.base import GRID_KINDS, Cell, GridKind, resolved_yaml
from mmpeft.grids.loading import load_grid_spec
from mmpeft.grids.method_setup import CompareSetup, load_methods_setup, shared_data, train_changes
from mmpeft.report.grid_report import (
    COLUMNS,
    groups_json,
    summarize_grid,
    summary_tables,
    write_grid_report,
    write_plots,
)
from mmpeft.runs.folder import METRICS_FILE
from mmpeft.specs import OutputSpec, Recipe

logger = logging.getLogger("mmpeft")

ZERO_SHOT_FILE = "zero_shot.json"


@GRID_KINDS.register("methods")
class MethodsKind(GridKind):
    name: ClassVar[str] = "methods"
    commands: ClassVar[tuple[str, ...]] = ("compare", "fewshot", "search")  # search: its chosen configurations

    def load_setup(self, data: dict, grid_data: Any, overrides: dict[str, Any], base_dir: Path, label: str | None,
                   command: str, problems: list[str]) -> CompareSetup:
        grid = load_grid_spec(grid_data, command, problems, "{methods: [full, lora], seeds: [0, 1]}")
        return load_methods_setup(data, grid, overrides, base_dir, label, command, problems)

    def plan_cells(self, setup: CompareSetup, grid_dir: Path) -> list[Cell]:
        """Seeds before methods, so an interrupted grid holds complete seeds; every cell pins the shared split.

        k = 0 trains nothing: it is in-context prompting's zero-shot row (generative fewshot), not a cell.
        """
        recipe, grid = setup.recipe, setup.grid
        data = shared_data(setup)
        cells = []
        for shots in [k for k in grid.shots if k != 0] if grid.shots else (recipe.data.shots,):
            for seed in grid.seeds:
                for entry in setup.methods:
                    name = f"{entry.label}-k{shots}-seed{seed}" if grid.shots else f"{entry.label}-seed{seed}"
                    cell_recipe = recipe.replace(
                        method=entry.config, seed=seed, data=dataclasses.replace(data, shots=shots),
                        train=dataclasses.replace(recipe.train, **train_changes(recipe, entry)),
                        eval=dataclasses.replace(recipe.eval, zero_shot=False),  # the grid evaluates zero-shot once
                        output=OutputSpec(dir=str(grid_dir / "cells"), name=name))
                    cells.append(Cell(name, entry.label, seed, shots, cell_recipe, grid_dir / "cells" / name))
        return cells

    def execute(self, cell: Cell, resume: bool) -> dict:
        from mmpeft.runs.single import run

        return run(None, resume=cell.dir) if resume else run(cell.recipe)

    def checkpoint(self, cell: Cell) -> Path | None:
        return cell.dir / "checkpoints" / "last" / "progress.json"

    def cell_row(self, cell: Cell, metrics: dict | None) -> dict:
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

    def shown(self, row: dict) -> str:
        return f"accuracy {row['accuracy']:.4f}"

    def columns(self, setup: CompareSetup, context: dict) -> dict[str, str]:
        return COLUMNS

    def setup_yaml(self, setup: CompareSetup, grid_dir: Path) -> str:
        """The resolved compare recipe saved in the grid folder: `--resume` reloads it, methods fully spelt out."""
        data = setup.recipe.to_dict()
        data.pop("method")
        grid = to_plain(setup.grid)
        grid["methods"] = [{"label": e.label, **to_plain(e.config), **({"train": e.train_changes} if e.train_changes
                                                                         else {})} for e in setup.methods]
        return resolved_yaml({**data, "grid": grid}, setup.command, grid_dir, "methods")

    def trained_recipes(self, setup: CompareSetup) -> list[tuple[str, Recipe]]:
        return [(entry.label, setup.recipe.replace(method=entry.config)) for entry in setup.methods]

    def strategies(self, setup: CompareSetup, family: str) -> tuple[str, ...]:
        """In-context strategies the grid prompts with: none in a methods grid (mmpeft.grids.fewshot adds them)."""
        if family == "generative" and setup.grid.templates:
            raise RecipeError(["grid.templates: prompt templates make dual-encoder zero-shot baselines; a generative "
                               "backbone's zero-shot row is the in-context k = 0 prompt (data.question): remove "
                               "them"])
        return ()

    def in_context_rows(self, setup: CompareSetup, grid_dir: Path, strategies: tuple[str, ...]) -> list[dict]:
        return []

    def check(self, setup: CompareSetup) -> dict:
        """The backbone's family decides the zero-shot row: templates (dual encoders) or in-context k = 0."""
        from mmpeft.grids.in_context import backbone_family

        family = backbone_family(setup.recipe)
        return {"family": family, "strategies": self.strategies(setup, family)}

    def begin(self, setup: CompareSetup, grid_dir: Path, context: dict) -> dict:
        family, strategies = context["family"], context["strategies"]
        cells = len(self.plan_cells(setup, grid_dir))
        logger.info("%s grid %s: %d cells (%d methods x %d seeds%s), split seed %d%s", setup.command, grid_dir,
                    cells, len(setup.methods), len(setup.grid.seeds),
                    f" x {len(setup.grid.shots)} shot counts" if setup.grid.shots else "", setup.split_seed,
                    f"; in-context prompting: {', '.join(strategies)}" if strategies else "")
        use_templates = setup.recipe.eval.zero_shot and family != "generative"
        zero_shot = zero_shot_baseline(setup, grid_dir) if use_templates else None
        rows = self.in_context_rows(setup, grid_dir, strategies) if strategies else []
        return {**context, "zero_shot": zero_shot, "rows": rows}

    def write_report(self, setup: CompareSetup, grid_dir: Path, cells: list[Cell], rows: list[dict],
                     context: dict) -> dict:
        strategies, zero_shot = context["strategies"], context["zero_shot"]
        shots = self.summary_shots(setup, strategies)
        groups = summarize_grid(rows, shots, [f"icl-{s}" for s in strategies] + [e.label for e in setup.methods],
                                setup.baseline)
        zero_line = zero_shot["rows"][0]["accuracy"] if zero_shot else self.zero_line(rows, strategies)
        zero_label = "zero-shot (in-context, k = 0)" if strategies else "zero-shot (recipe prompts)"
        tables = summary_tables(groups, setup.baseline, zero_line, zero_label, in_context=bool(strategies))
        write_text(grid_dir / "summary.md", f"# Summary: {setup.recipe.name}\n\n{tables}")
        plots = write_plots(grid_dir, groups, zero_line, setup.recipe.name, in_context=bool(strategies))
        icl = self.in_context_outputs(setup, grid_dir, rows, strategies, plots)
        write_grid_report(grid_dir, setup, rows, zero_shot, tables, plots, data_info(grid_dir, zero_shot, rows), icl)
        write_json(grid_dir / "summary.json", groups_json(groups))
        failed = [r for r in rows if r["status"] != "ok"]
        what = "rows" if strategies else "cells"
        print(f"{setup.command}: {len(rows) - len(failed)}/{len(rows)} {what} ok; table and plots in "
              f"{grid_dir / 'report.md'}", flush=True)
        return {"dir": str(grid_dir), "rows": rows, "summary": groups_json(groups), "zero_shot": zero_shot}

    def summary_shots(self, setup: CompareSetup, strategies: tuple[str, ...]) -> list[int | None]:
        return list(setup.grid.shots or (setup.recipe.data.shots,))

    def zero_line(self, rows: list[dict], strategies: tuple[str, ...]) -> float | None:
        return None

    def in_context_outputs(self, setup: CompareSetup, grid_dir: Path, rows: list[dict], strategies: tuple[str, ...],
                           plots: list[str]) -> dict | None:
        return None


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


def zero_shot_baseline(setup: CompareSetup, grid_dir: Path) -> dict:
    """Zero-shot accuracy per template, ensemble and recipe prompts on the shared test split; computed once."""
    from mmpeft.data import load_data
    from mmpeft.evaluation.zero_shot import evaluate_zero_shot, expand_templates
    from mmpeft.features import bind_features
    from mmpeft.runs.build import load_base
    from mmpeft.runs.evaluate import evaluation_sets

    first: Recipe = MethodsKind().plan_cells(setup, grid_dir)[0].recipe  # the shared split; no k-shot sample needed
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
