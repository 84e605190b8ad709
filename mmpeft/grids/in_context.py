"""In-context prompting beside trained methods: the `icl-<strategy>` rows of a generative fewshot grid (a helper of
mmpeft.grids.fewshot).

Why in the grid rather than a separate command: prompting a generative VLM with k demonstrations and fine-tuning it
with LoRA on k examples per class answer the same question (how much does a little labelled data buy?), so their
rows belong in one table. The rows use the cells' shared split (every test image is a query, as for the cells);
demonstrations come from its train split, drawn per seed by mmpeft.evaluation.icl. Here k counts demonstrations in
the prompt (for trained methods it counts examples per class), and k = 0, the prompt alone, is the zero-shot row.
Each seed's rows are saved in icl/seed<s>.json and reused when the grid runs again with the same settings.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from mmpeft.core.io import write_json, write_text
from mmpeft.core.schema import RecipeError, to_plain
from mmpeft.grids.cells import error_message
from mmpeft.grids.method_setup import CompareSetup, shared_data
from mmpeft.specs import Recipe

logger = logging.getLogger("mmpeft")

ICL_DIR = "icl"
ICL_COLUMNS = {  # results columns only in-context rows fill (their `cell` names no folder: see icl/)
    "strategy": "in-context rows: how demonstrations were drawn; their `shots` is demonstrations per prompt (not "
                "per class), 0 = the zero-shot prompt",
    "truncated_prompts": "in-context rows: prompts that exceeded the context and lost whole demonstrations",
    "dropped_demos": "in-context rows: demonstrations dropped to fit the context, all prompts together",
    "over_limit": "in-context rows: prompts still too long with every demonstration dropped",
    "icl_seconds": "in-context rows: wall seconds to build and score every prompt of the row",
}


def backbone_family(recipe: Recipe) -> str:
    """dual_encoder or generative, from the backbone's config (a demo backbone is built first, as a cell would)."""
    from mmpeft.backbones import detect_family, resolve_path

    return detect_family(resolve_path(recipe.backbone), recipe.backbone)


def icl_strategies(setup: CompareSetup, family: str) -> tuple[str, ...]:
    """The strategies a fewshot grid prompts with (none off a generative backbone); misuse is refused before any run."""
    from mmpeft.evaluation.icl import STRATEGIES

    grid, problems = setup.grid, []
    if family != "generative":
        what = f"backbone.id {setup.recipe.backbone.id!r} is a {family} backbone"
        if grid.strategies is not None:
            problems.append(f"grid.strategies: in-context prompting needs a generative backbone; {what}")
        if grid.shots and 0 in grid.shots:
            problems.append(f"grid.shots: k = 0 is in-context prompting's zero-shot row (generative backbones); "
                            f"{what}, whose zero-shot baselines come from eval.zero_shot: remove 0")
        if not setup.methods:
            problems.append(f"grid.methods: list at least one method; {what}, so nothing would run")
        if problems:
            raise RecipeError(problems)
        return ()
    if grid.templates:
        problems.append("grid.templates: prompt templates make dual-encoder zero-shot baselines; a generative "
                        "backbone's zero-shot row is the in-context k = 0 prompt (data.question): remove them")
    strategies = tuple(grid.strategies or STRATEGIES)
    taken = sorted({e.label for e in setup.methods} & {f"icl-{s}" for s in strategies})
    if taken:
        problems.append(f"grid.methods: label(s) {', '.join(taken)} name in-context rows; give those entries another "
                        "`label:`")
    if problems:
        raise RecipeError(problems)
    return strategies


def icl_shots(setup: CompareSetup) -> list[int]:
    """k values of the in-context rows: grid.shots, with k = 0 first when eval.zero_shot asks for a zero-shot row."""
    shots = list(setup.grid.shots or ())
    return shots if 0 in shots or not setup.recipe.eval.zero_shot else [0, *shots]


def icl_rows(setup: CompareSetup, grid_dir: Path, strategies: tuple[str, ...]) -> list[dict]:
    """Rows per (strategy, k, seed) on the cells' shared split; a seed finished with the same settings is reused,
    a failing seed is recorded (status failed, error) and the grid goes on."""
    from mmpeft.runs.icl import run_icl_sweep

    recipe = setup.recipe.replace(data=shared_data(setup))
    shots = icl_shots(setup)
    key = json.loads(json.dumps({"backbone": to_plain(recipe.backbone), "data": to_plain(recipe.data),
                                 "eval": to_plain(recipe.eval), "shots": shots, "strategies": list(strategies)}))
    rows = []
    for seed in setup.grid.seeds:
        path = grid_dir / ICL_DIR / f"seed{seed}.json"
        error_path = path.with_suffix(".error.txt")
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if saved.get("key") == key:
            logger.info("in-context rows, seed %d: finished earlier, skipped", seed)
            found = saved["rows"]
        else:
            try:
                found = run_icl_sweep(recipe, shots, strategies, seeds=(seed,), max_queries=None)
                write_json(path, {"key": key, "rows": found})
                error_path.unlink(missing_ok=True)
            except Exception as error:
                message = error_message(error)
                logger.error("in-context rows, seed %d failed: %s", seed, message)
                write_text(error_path, traceback.format_exc())
                found = [{"method": f"icl-{s}", "strategy": s, "shots": k, "seed": seed, "status": "failed",
                          "error": message} for k in shots for s in strategies]
        rows += [icl_row(r) for r in found]
        shown = ", ".join(f"{r['method']} k={r['shots']}: {r['accuracy']:.4f}" for r in found if "accuracy" in r)
        print(f"in-context, seed {seed}: {shown or 'FAILED: ' + found[0]['error']}", flush=True)
    return rows


def icl_row(found: dict) -> dict:
    """A run_icl_sweep row in the results table's shape: nothing trained, no cell folder."""
    row = {"cell": f"{found['method']}-k{found['shots']}-seed{found['seed']}", "method": found["method"],
           "method_name": "icl", "seed": found["seed"], "shots": found["shots"], "status": found["status"],
           "error": found.get("error", ""), "strategy": found["strategy"]}
    if found["status"] == "ok":
        row.update({"accuracy": found["accuracy"], "macro_f1": found["macro_f1"], "trainable_params": 0,
                    "trainable_percent": 0.0, "train_seconds": 0.0, "samples_per_second": None,
                    "truncated_prompts": found["truncated_prompts"],
                    "dropped_demos": found["dropped_demos"], "over_limit": found["over_limit"],
                    "icl_seconds": found["seconds"]})
    return row


def icl_zero_line(rows: list[dict], strategies: tuple[str, ...]) -> float | None:
    """Mean over seeds of the k = 0 accuracy (no demonstrations: the same for every strategy): the zero-shot line."""
    zero = [r["accuracy"] for r in rows if r["method_name"] == "icl" and r["shots"] == 0 and r["status"] == "ok"
            and strategies and r["strategy"] == strategies[0]]
    return sum(zero) / len(zero) if zero else None


def icl_outputs(grid_dir: Path, rows: list[dict], strategies: tuple[str, ...], setup: CompareSetup) -> dict:
    """icl/icl.md and icl/icl_accuracy.png (accuracy vs k per strategy), and the facts report.md states."""
    from mmpeft.evaluation.icl import write_outputs

    done = [{**r, "seconds": r["icl_seconds"]} for r in rows if r["method_name"] == "icl" and r["status"] == "ok"]
    if done:
        write_outputs(grid_dir / ICL_DIR, done, setup.recipe.name)
    return {"strategies": list(strategies), "shots": icl_shots(setup), "rows": len(done),
            "truncated": sum(r["truncated_prompts"] for r in done), "dropped": sum(r["dropped_demos"] for r in done)}
