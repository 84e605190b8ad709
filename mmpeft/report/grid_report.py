"""A compare grid's outputs: results.csv/json (one row per cell), summary.md, plots and report.md.

The summary aggregates the cells of each (k, method) over seeds; "best" marks compare trained methods only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mmpeft.core.io import write_csv, write_json, write_text
from mmpeft.report.grid_plots import Point, efficiency_png, shots_png, time_png
from mmpeft.report.stats import ALPHA, paired_test, summarize

# The columns of results.csv / results.json, with what each holds (results.json carries these descriptions).
COLUMNS = {
    "cell": "cell folder under cells/",
    "method": "grid label of the method",
    "method_name": "registered method the label runs",
    "seed": "seed of the cell (init, batch order, k-shot sample); the split is shared by every cell",
    "shots": "training examples per class (empty: all)",
    "status": "ok or failed",
    "accuracy": "test accuracy under data.shift (the split is touched only for these final numbers)",
    "macro_f1": "test macro-F1 under data.shift",
    "trainable_params": "parameters with requires_grad after the method was applied",
    "total_params": "all parameters after the method was applied",
    "trainable_percent": "100 * trainable / total",
    "train_seconds": "wall seconds of the training loop (excludes loading, evaluation, one-off feature extraction)",
    "samples_per_second": "training examples processed per second of the training loop",
    "weights_bytes": "bytes of the model's parameters and buffers after apply (not a process peak: CPU RSS is "
                     "process-wide and never decreases, so it cannot be told apart per cell)",
    "cuda_peak_bytes": "torch.cuda.max_memory_allocated during the cell (empty without CUDA)",
    "feature_cache": "whether cached image features of the frozen image tower were used",
    "train_sample": "fingerprint of the training examples (equal for every method at one seed and k)",
    "test_split": "fingerprint of the test split (equal for every cell)",
    "val_split": "fingerprint of the validation split (equal for every cell)",
    "error": "why a failed cell failed (full traceback in cells/<cell>/error.txt)",
}
PLOTS = {"params": "accuracy_vs_params.png", "shots": "accuracy_vs_shots.png", "time": "accuracy_vs_time.png"}


def shots_text(shots: int | None) -> str:
    return "all" if shots is None else str(shots)


def write_results(grid_dir: Path, rows: Sequence[dict], described: dict[str, str] = COLUMNS) -> None:
    """results.csv and results.json, written atomically (also after every cell, so progress is visible).

    `described`: the columns in order with what each holds (a regularisers grid has its own); others follow.
    """
    columns = list(described) + sorted({k for row in rows for k in row if k not in described})
    write_csv(grid_dir / "results.csv", rows, columns)
    write_json(grid_dir / "results.json", {"columns": described, "rows": _clean(list(rows))})


def summarize_grid(rows: Sequence[dict], shots: Sequence[int | None], labels: Sequence[str],
                   baseline: str | None) -> list[dict]:
    """One entry per (k, method) in grid order: stats over ok seeds and the paired test against the baseline."""
    groups = []
    for k in shots:
        at_k = [r for r in rows if r["shots"] == k]
        base = {r["seed"]: r["accuracy"] for r in at_k if r["method"] == baseline and r["status"] == "ok"}
        for label in labels:
            cells = [r for r in at_k if r["method"] == label]
            if not cells:  # e.g. k = 0: in-context rows only, nothing trains
                continue
            ok = [r for r in cells if r["status"] == "ok"]
            entry: dict[str, Any] = {
                "shots": k, "method": label, "seeds": len(ok), "failed": len(cells) - len(ok),
                "accuracy": summarize([r["accuracy"] for r in ok]),
                "macro_f1": summarize([r["macro_f1"] for r in ok]),
                "train_seconds": summarize([r["train_seconds"] for r in ok]),
                "trainable_params": _mean([r["trainable_params"] for r in ok]),
                "trainable_percent": _mean([r["trainable_percent"] for r in ok]),
                "samples_per_second": _mean([r["samples_per_second"] for r in ok]),
                "paired": None,
            }
            if baseline is not None and label != baseline:
                entry["paired"] = paired_test({r["seed"]: r["accuracy"] for r in ok}, base)
            groups.append(entry)
    return groups


def summary_tables(groups: Sequence[dict], baseline: str | None, zero_shot: float | None,
                   zero_label: str = "zero-shot (recipe prompts)", in_context: bool = False) -> str:
    """Markdown: one table per k; bold = best in its column among methods with results.

    `in_context`: the grid has in-context rows, for which k counts demonstrations and k = 0 is the zero-shot row.
    """
    lines = []
    for k in dict.fromkeys(g["shots"] for g in groups):
        at_k = [g for g in groups if g["shots"] == k and g["seeds"] > 0]
        trained = [g for g in at_k if g["trainable_params"] > 0]  # nothing trained is not "cheapest"
        lines += [f"### {_k_heading(k, in_context)}", ""]
        header = ["method", "seeds", "accuracy (mean ± std)", "95% CI", "macro-F1 (mean ± std)", "trainable params",
                  "trainable %", "train s", "samples/s"]
        header += [f"vs {baseline} (paired t-test, seeds)"] if baseline else []
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        tail = " – |" if baseline else ""
        best = {"accuracy": _best(at_k, lambda g: g["accuracy"].mean, max),
                "macro_f1": _best(at_k, lambda g: g["macro_f1"].mean, max),
                "params": _best(trained, lambda g: g["trainable_params"], min),
                "seconds": _best(trained, lambda g: g["train_seconds"].mean, min),
                "speed": _best(at_k, lambda g: g["samples_per_second"], max)}
        if zero_shot is not None and not (in_context and k == 0):  # k = 0 in-context rows are the zero-shot
            lines.append(f"| {zero_label} | – | {zero_shot:.4f} | – | – | 0 | 0 | 0 | – |{tail}")
        for g in [g for g in groups if g["shots"] == k]:
            if g["seeds"] == 0:
                lines.append(f"| {g['method']} | 0 ({g['failed']} failed) | – | – | – | – | – | – | – |{tail}")
                continue
            acc, f1, sec = g["accuracy"], g["macro_f1"], g["train_seconds"]
            cells = [
                g["method"], f"{g['seeds']}" + (f" ({g['failed']} failed)" if g["failed"] else ""),
                _bold(_pm(acc), g is best["accuracy"]), _ci(acc), _bold(_pm(f1), g is best["macro_f1"]),
                _bold(f"{g['trainable_params']:,.0f}", g is best["params"]), f"{g['trainable_percent']:.3f}",
                _bold(f"{sec.mean:.1f}", g is best["seconds"]),
                _bold(_num(g["samples_per_second"], ".0f"), g is best["speed"]),
            ] + ([_paired(g, baseline)] if baseline else [])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Bold: best in its column. 95% CI: Student-t interval of the mean over seeds. Paired t-test "
                 f"(scipy.stats.ttest_rel) on test accuracy per seed against `{baseline}`, alpha = {ALPHA}; "
                 "with fewer than 2 shared seeds there is no test." if baseline else
                 "Bold: best in its column. 95% CI: Student-t interval of the mean over seeds. No paired test: "
                 "the grid has no `full` entry (set grid.baseline to compare against another method).")
    return "\n".join(lines) + "\n"


def _k_heading(k: int | None, in_context: bool) -> str:
    """What k means in this table: examples per class, and for in-context rows demonstrations per prompt."""
    if not in_context:
        return f"k = {shots_text(k)} training examples per class"
    if k == 0:
        return "k = 0: the prompt alone (in-context rows; nothing trained)"
    return f"k = {k}: training examples per class (trained methods), demonstrations per prompt (icl-* rows)"


def write_plots(grid_dir: Path, groups: Sequence[dict], zero_shot: float | None, title: str,
                in_context: bool = False) -> list[str]:
    """The PNGs this grid supports; returns their file names (the shots plot needs at least two k values)."""
    ks = list(dict.fromkeys(g["shots"] for g in groups))
    k_last = ([k for k in ks if k != 0] or ks)[-1]  # k = 0 (in-context, nothing trained) is the zero-shot line
    last = [g for g in groups if g["shots"] == k_last and g["seeds"] > 0]
    where = f" (k = {shots_text(k_last)})" if len(ks) > 1 or k_last is not None else ""
    made = []
    points = [Point(g["method"], g["trainable_params"], g["accuracy"].mean, std(g["accuracy"])) for g in last]
    efficiency_png(points, zero_shot, grid_dir / PLOTS["params"], f"{title}: accuracy vs trainable parameters{where}")
    made.append(PLOTS["params"])
    if len(ks) > 1 and None not in ks:
        series: dict[str, list] = {}
        for g in groups:
            if g["seeds"] > 0 and g["shots"] != 0:  # log2 axis; k = 0 is the dashed zero-shot line
                series.setdefault(g["method"], []).append((g["shots"], g["accuracy"].mean, std(g["accuracy"])))
        xlabel = ("k (trained: examples per class; icl-*: demonstrations per prompt; log scale)" if in_context
                  else "training examples per class (k, log scale)")
        shots_png(series, zero_shot, grid_dir / PLOTS["shots"], f"{title}: accuracy vs shots", xlabel)
        made.append(PLOTS["shots"])
    points = [Point(g["method"], g["train_seconds"].mean, g["accuracy"].mean, std(g["accuracy"]),
                    std(g["train_seconds"])) for g in last]
    time_png(points, zero_shot, grid_dir / PLOTS["time"], f"{title}: accuracy vs training time{where}")
    made.append(PLOTS["time"])
    return made


def zero_shot_table(rows: Sequence[dict]) -> str:
    shifts = list(rows[0]["shifts"]) if rows else []
    lines = ["| prompts | " + " | ".join(f"accuracy [{s}]" for s in shifts) + " | macro-F1 |",
             "|---|" + "---|" * (len(shifts) + 1)]
    for row in rows:
        lines.append(f"| {row['prompts']} | " + " | ".join(f"{row['shifts'][s]:.4f}" for s in shifts)
                     + f" | {row['macro_f1']:.4f} |")
    return "\n".join(lines) + "\n"


def groups_json(groups: Sequence[dict]) -> list[dict]:
    return _clean([{k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in g.items()}
                   for g in groups])


def _paired(group: dict, baseline: str | None) -> str:
    if baseline is None:
        return "–"
    if group["method"] == baseline:
        return "baseline"
    return paired_text(group["paired"])


def paired_text(test) -> str:
    """A PairedTest for a table cell: the mean difference, the verdict and n."""
    if test.n < 2 or math.isnan(test.mean_difference):
        return test.verdict
    return f"Δ {test.mean_difference:+.4f}: {test.verdict}, n={test.n}"


def std(s) -> float:
    """A summary's std for an error bar: 0 where one seed gives no spread to show."""
    return 0.0 if math.isnan(s.std) else s.std


def _pm(s) -> str:
    return f"{s.mean:.4f}" if math.isnan(s.std) else f"{s.mean:.4f} ± {s.std:.4f}"


def _ci(s) -> str:
    return "–" if math.isnan(s.ci_low) else f"[{s.ci_low:.4f}, {s.ci_high:.4f}]"


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None or math.isnan(value) else format(value, spec)


def _bold(text: str, flag: bool) -> str:
    return f"**{text}**" if flag else text


def _best(groups: Sequence[dict], key, pick):
    scored = [(key(g), i) for i, g in enumerate(groups) if key(g) is not None and not math.isnan(key(g))]
    if len(scored) < 2:
        return None
    value = pick(v for v, _ in scored)
    return next(groups[i] for v, i in scored if v == value)


def _mean(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else math.nan


def _clean(value: Any) -> Any:
    """NaN -> None, so the JSON is valid everywhere."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def sharing_check(rows: Sequence[dict]) -> str:
    """Read back from the cells' own metrics that they shared the split and, per seed and k, the training sample."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("test_split")]
    if not ok:
        return "No finished cell to check the shared split against."
    splits = {(r["test_split"], r.get("val_split")) for r in ok}
    samples: dict[tuple, set] = {}
    for r in ok:
        samples.setdefault((r["seed"], r["shots"]), set()).add(r["train_sample"])
    split_text = (f"all {len(ok)} finished cells used the same validation and test split (test fingerprint "
                  f"`{ok[0]['test_split']}`)" if len(splits) == 1 else
                  f"WARNING: the finished cells used {len(splits)} different splits")
    mixed = [f"seed {s}, k {shots_text(k)}" for (s, k), prints in samples.items() if len(prints) > 1]
    sample_text = ("for every seed and k, every method trained on the same examples" if not mixed else
                   f"WARNING: methods trained on different examples at {', '.join(mixed)}")
    return f"Checked from each cell's metrics.json: {split_text}; {sample_text}."


def write_grid_report(grid_dir: Path, setup, rows: Sequence[dict], zero_shot: dict | None, tables: str,
                      plots: Sequence[str], info: dict | None, icl: dict | None = None) -> None:
    """report.md: the protocol, the zero-shot baselines, the summary tables and the plots, in one page.

    `icl` (generative fewshot): strategies, k values and truncation counts of the in-context rows.
    """
    recipe, grid = setup.recipe, setup.grid
    trained_shots = [k for k in grid.shots or () if k != 0]
    cells = sum(1 for r in rows if r.get("method_name") != "icl")
    lines = [f"# {setup.command.capitalize()}: {recipe.name}", "",
             f"{len(setup.methods)} methods x {len(grid.seeds)} seeds"
             + (f" x {len(trained_shots)} shot counts" if trained_shots else "") + f" = {cells} cells"
             + (f", plus in-context prompting: {len(icl['strategies'])} strategies x {len(icl['shots'])} values of k "
                f"x {len(grid.seeds)} seeds = {len(rows) - cells} rows" if icl else "") + ". "
             "Numbers are test accuracy (mean ± std over seeds) unless stated.", "", "## Protocol", "",
             *protocol_lines(setup, rows, info, icl), "",
             "| label | method | settings from | settings | budget changes |",
             "|---|---|---|---|---|"]
    for entry in setup.methods:
        settings = {k: v for k, v in _plain(entry.config).items() if k != "name"}
        changes = ", ".join(f"{k}: {v}" for k, v in entry.train_changes.items()) or "–"
        lines.append(f"| {entry.label} | {entry.config.name} | {entry.source} | `{settings}` | {changes} |")
    if zero_shot:
        lines += ["", "## Zero-shot baselines (test)", "",
                  "The untouched backbone, scored against each prompt template alone, their ensemble (class text "
                  "embeddings averaged over the templates) and the recipe's own prompts (what every cell starts "
                  "from; the dashed line in the plots).", "", zero_shot_table(zero_shot["rows"])]
    lines += ["## Results", "", tables, "## Plots", ""]
    lines += [f"![{name}]({name})" for name in plots]
    lines += failed_cells(rows)
    lines += ["", "## Files", "", "`results.csv` / `results.json`: one row per cell (`results.json` also describes "
              "each column); `summary.md`, `summary.json`: the tables above; "
              + ("`zero_shot.json`; " if zero_shot else "")
              + ("`icl/`: the in-context rows per seed (`seed<s>.json`), `icl.md` and `icl_accuracy.png`; " if icl
                 else "")
              + "`cells/<cell>/`: each cell's run folder (recipe, metrics.json, report, adapter); `compare.yaml`: the "
              f"resolved recipe (`mmpeft {setup.command} --resume {grid_dir}` continues or re-checks the grid).", ""]
    write_text(grid_dir / "report.md", "\n".join(lines))


def protocol_lines(setup, rows: Sequence[dict], info: dict | None, icl: dict | None) -> list[str]:
    """The report's protocol bullets: backbone, data, splits, examples, seeds, budget, caches, memory, sharing."""
    recipe, grid = setup.recipe, setup.grid
    trained_shots = [k for k in grid.shots or () if k != 0]
    data, train = recipe.data, recipe.train
    counts = (info or {}).get("counts", {})
    selection = (f"the epoch with the best validation {train.select_metric}" if data.split.val > 0 else
                 "the last epoch (data.split.val is 0: no validation split)")
    if train.early_stopping_patience is not None:
        selection += f", stopping after {train.early_stopping_patience} epochs without improvement"
    shots = (", ".join(map(str, trained_shots)) + " examples per class, sampled per seed and nested (a larger k "
             "contains the smaller k's examples)") if trained_shots else (
        f"{data.shots} per class" if data.shots else "all training examples")
    return [
        f"- Backbone: `{recipe.backbone.id}` ({recipe.backbone.dtype}"
        + (", quantized" if recipe.backbone.quantization else "") + ").",
        f"- Data: `{data.source}` ({(info or {}).get('where', data.path)}), "
        f"{(info or {}).get('classes', '?')} classes; image shift `{'+'.join(data.shift) or 'none'}`"
        + (f"; also tested under {', '.join(data.eval_shifts)}" if data.eval_shifts else "") + ".",
        f"- Splits: stratified, validation {data.split.val:.0%} and test {data.split.test:.0%} of the images, "
        f"drawn once with split seed {setup.split_seed} and shared by every cell"
        + (f" ({', '.join(f'{k} {v}' for k, v in counts.items())} images)" if counts else "")
        + ". The test split is used only for the final numbers; model selection uses "
        f"{selection}.",
        f"- Training examples: {shots}.",
        f"- Seeds: {', '.join(map(str, grid.seeds))}; a seed sets the method's initialisation, the batch order"
        " and the k-shot sample, not the split.",
        f"- Budget, the same for every cell except the per-method changes in the table below: "
        f"{train.epochs} epochs, batch {train.batch_size}, lr {train.lr:g}, "
        f"weight decay {train.weight_decay:g}, warmup {train.warmup_ratio:g}, {train.optimizer}, "
        f"mixed precision {train.mixed_precision}, augmentation "
        + ("on" if _augmenting(data.augment) else "off") + ".",
        f"- Feature cache: `{train.feature_cache}`; {sum(1 for r in rows if r.get('feature_cache'))} cells "
        "reused image features of their frozen image tower. Train seconds exclude that one-off extraction.",
        "- Memory: `weights_bytes` is the model's parameters and buffers after the method was applied; "
        "`cuda_peak_bytes` is the CUDA allocator's peak during the cell (GPU only). Process RSS is not "
        "reported: it is process-wide and never decreases, so it cannot be attributed to one cell.",
        f"- {sharing_check(rows)}", *_icl_protocol(icl)]


def _icl_protocol(icl: dict | None) -> list[str]:
    """The report's protocol bullet for in-context rows (none without them)."""
    if not icl:
        return []
    truncated = (f" {icl['truncated']} prompts exceeded the model's context and lost {icl['dropped']} whole "
                 "demonstrations (icl/icl.json has them per row)." if icl["truncated"] else
                 " No prompt exceeded the model's context.")
    return [f"- In-context prompting (rows `icl-<strategy>`, nothing trained): k = {', '.join(map(str, icl['shots']))} "
            "demonstrations (image, question, answer) from the shared train split before each test query, chosen "
            f"by {', '.join(icl['strategies'])} (random: by seed; balanced: classes in turn; nearest: most similar "
            "train images by the backbone's image embedding). Here k counts demonstrations per prompt, not examples "
            "per class; k = 0 (the question alone) is the zero-shot row. Every image of the shared test split is a "
            "query, as for the trained cells; labels are scored by likelihood." + truncated]


def _augmenting(spec) -> bool:
    from mmpeft.data.augment import augment_enabled

    return augment_enabled(spec)


def _plain(config) -> dict:
    from mmpeft.core.schema import to_plain

    return to_plain(config)


def failed_cells(rows: list[dict]) -> list[str]:
    """Report lines naming each failed cell and where its traceback is; none when every cell ran."""
    failed = [r for r in rows if r["status"] != "ok"]
    if not failed:
        return []
    return ["", "## Failed cells", ""] + [f"- `{r['cell']}`: {r['error']} (traceback in cells/{r['cell']}/error.txt)"
                                          for r in failed]
