"""`merge(run_dirs, weights)`: several runs' peft adapters on one base combined into one adapter by peft's
`add_weighted_adapter` (linear: the exact weighted sum of the changes; TIES, DARE), then evaluated on every source
run's test split in one table."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from mmpeft.artifacts.card import model_card
from mmpeft.artifacts.loading import CARD, load_adapter, write_manifest
from mmpeft.artifacts.runs import (
    ExportError,
    RunFolder,
    check_out_folder,
    non_finite_tensors,
    read_run,
    run_data,
    run_labels,
)
from mmpeft.artifacts.single import base_info, manifest_for, run_scores
from mmpeft.core.io import atomic_dir, write_json, write_text
from mmpeft.core.schema import to_plain
from mmpeft.data.conversation_data import CONVERSATION_SOURCES

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone

logger = logging.getLogger("mmpeft")

MergeHow = Literal["linear", "ties", "dare_linear", "dare_ties"]
MERGE_HOWS = ("linear", "ties", "dare_linear", "dare_ties")
DEFAULT_DENSITY = 0.5  # ties / dare: the fraction of each adapter's entries kept
RESULTS = "merge_results"  # .json and .md


def merge(run_dirs: list[str | Path], weights: list[float] | None = None, how: MergeHow = "linear",
          density: float | None = None, out: str | Path = "merged-adapter", seed: int = 0) -> dict:
    """Combine the adapters of runs that share a base and a peft method; returns the evaluation table and manifest.

    weights: one per run (default: equal, summing to 1). density: for ties / dare only (default 0.5). seed: DARE
    drops entries at random. The result is a peft adapter (`PeftModel.from_pretrained(base, out)`), evaluated with
    each source run's label set on its test split; `out/merge_results.{md,json}` hold the table.
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        raise ExportError(f"run_dirs: {str(run_dirs)!r} is one folder; give a list of at least 2 run folders")
    runs = [read_run(path) for path in run_dirs]
    unlabelled = [str(run.path) for run in runs
                  if run.recipe.data.source not in CONVERSATION_SOURCES and not len(run_labels(run))]
    if unlabelled:  # caption-only data: retrieval only, no label set to score the merged adapter with
        raise ExportError(f"{', '.join(unlabelled)}: trained on caption-only data, which has no classes; merge scores "
                          "the merged adapter by accuracy on each run's test classes, so it needs runs on labelled "
                          "data (export each run instead: mmpeft export RUN --out DIR)")
    for run in runs:
        run_scores(run, tested=True)  # the table compares with them: refused before anything is built
    weights = check_arguments(runs, weights, how, density)
    if how != "linear" and density is None:
        density = DEFAULT_DENSITY
    check_compatible(runs, how)
    check_out_folder(out, runs)
    out = Path(out)
    first = runs[0]
    with atomic_dir(out) as stage:
        base = combine(runs, weights, how, density, seed, stage)
        for _, bad in non_finite_tensors(stage):  # finite weights can still overflow the adapter's dtype
            raise ExportError(f"the {how} merge with weights {weights} holds NaN or infinity in {len(bad)} tensor(s) "
                              f"({', '.join(bad[:2])}): the weights are too large; nothing was written")
        data = [run_data(run) for run in runs]
        manifest = manifest_for(first, data[0], "merge", "peft", base, None, 0, first.recipe.backbone.dtype,
                                [], merge={"how": how, "weights": weights, "density": density, "seed": seed})
        manifest["source_runs"] = [str(run.path.resolve()) for run in runs]
        manifest["size_bytes"] = sum(p.stat().st_size for p in stage.glob("*.safetensors"))
        write_manifest(stage, manifest)
        backbone = load_adapter(stage)  # evaluate what was written, loaded as a user would
        rows = evaluate(backbone, runs, data)
        manifest["metrics"] = rows
        write_json(stage / f"{RESULTS}.json", {"how": how, "weights": weights, "density": density, "seed": seed,
                                                "runs": rows})
        table = results_table(rows, how, weights, density)
        write_text(stage / f"{RESULTS}.md", table)
        manifest = write_manifest(stage, manifest)
        card_rows = [f"| merge | `{how}`, weights {weights}{f', density {density}' if density is not None else ''} |"]
        if note := labels_note(runs, data):
            card_rows.append(f"| labels | {note} |")
            print(f"note: {note}", flush=True)
        write_text(stage / CARD, model_card(manifest, f"{how} merge of {len(runs)} adapters", card_rows))
    print(table, flush=True)
    print(f"merged adapter: {out}", flush=True)
    return {**manifest, "out": str(out), "table": rows}


def labels_note(runs: list[RunFolder], data: list) -> str | None:
    """Runs trained on different label sets merge fine (task arithmetic), but the export records one set: say which."""
    names = [d.labels.names for d in data]
    if all(n == names[0] for n in names[1:]):
        return None
    return (f"the source runs have different label sets; `mmpeft predict` on this adapter uses the first run's "
            f"({', '.join(names[0])}: {runs[0].path.name}) unless --labels names others")


def check_arguments(runs: list[RunFolder], weights: list[float] | None, how: str, density: float | None,
                    ) -> list[float]:
    if len(runs) < 2:
        raise ExportError(f"merge needs at least 2 run folders, got {len(runs)}")
    if how not in MERGE_HOWS:
        raise ExportError(f"how: {how!r} is not one of {', '.join(MERGE_HOWS)}")
    if weights is None:
        weights = [1.0 / len(runs)] * len(runs)
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ExportError(f"weights: {weights!r} must be a list of numbers, one per run") from None
    if not all(math.isfinite(w) for w in weights):
        raise ExportError(f"weights: {weights} must all be finite numbers (a NaN or infinite weight makes every "
                          "merged entry NaN)")
    if len(weights) != len(runs):
        raise ExportError(f"weights: {len(weights)} given for {len(runs)} runs; give one weight per run")
    if not any(weights):
        raise ExportError(f"weights: {weights} are all zero, so the merged adapter would change nothing (it would be "
                          "the base model); give at least one weight that is not 0")
    seen: dict[Path, Path] = {}
    for run in runs:
        twice = seen.setdefault(run.path.resolve(), run.path)
        if twice is not run.path:
            raise ExportError(f"run {run.path} is given twice (also as {twice}); merge different runs, and weight "
                              "one run more with --weights")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise ExportError(f"density: {density!r} must be a number in (0, 1] (the fraction of entries kept)")
        if how == "linear":
            raise ExportError("density applies to ties, dare_linear and dare_ties only, not to how: linear")
        if not 0 < density <= 1:
            raise ExportError(f"density: {density} must be in (0, 1] (the fraction of entries kept)")
    return weights


def check_compatible(runs: list[RunFolder], how: str = "linear") -> None:
    """Same base (everything about it), same peft method; refuse what peft's weighted merge would get wrong."""
    first = runs[0]
    for run in runs[1:]:
        a, b = to_plain(first.recipe.backbone), to_plain(run.recipe.backbone)
        differ = [f"backbone.{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]
        if differ:
            raise ExportError(f"runs {first.path} and {run.path} have different bases ({'; '.join(differ)}): "
                              "only adapters trained on the same base can be merged")
        if run.recipe.method.name != first.recipe.method.name:
            raise ExportError(f"runs {first.path} and {run.path} used different methods "
                              f"({first.recipe.method.name!r} vs {run.recipe.method.name!r}); merge runs of one method")
    for run in runs:
        if run.format != "peft":
            raise ExportError(f"run {run.path}: method {run.method.name!r} is not a peft adapter; weighted merges use "
                              "peft's add_weighted_adapter (lora, ia3)")
        method = run.recipe.method
        if getattr(method, "use_dora", False):
            raise ExportError(f"run {run.path}: DoRA adapters cannot be weighted-merged: peft's add_weighted_adapter "
                              "combines the LoRA matrices only and would drop the trained magnitudes")
        if getattr(method, "bias", "none") != "none":
            raise ExportError(f"run {run.path}: method.bias: {method.bias!r} trains base biases, which peft's "
                              "weighted merge does not combine; merge runs trained with bias: none")
    if first.recipe.method.name != "lora" and how != "linear":
        raise ExportError(f"how: {how!r}: peft merges {first.recipe.method.name} adapters by their weighted sum only; "
                          "use how: linear (ties and dare are for LoRA)")


def combination(model: Any, how: str, density: float | None) -> dict:
    """peft's arguments for `how`. LoRA's linear is peft's `cat`: the ranks side by side, so the merged change is
    exactly sum(w_i * B_i A_i); peft's own `linear` weights A and B separately (merging a run with itself at
    0.5/0.5 would double its change). IA3 has one way: the weighted sum of its vectors."""
    from peft import LoraConfig

    if not isinstance(next(iter(model.peft_config.values())), LoraConfig):
        return {}
    kwargs: dict[str, Any] = {"combination_type": "cat" if how == "linear" else how}
    if density is not None:
        kwargs["density"] = density
    return kwargs


def combine(runs: list[RunFolder], weights: list[float], how: str, density: float | None, seed: int,
            stage: Path):
    """Load every source adapter onto one base, add the weighted combination as "default", save only that.
    Returns what identifies the base (single.base_info)."""
    from peft import PeftModel

    from mmpeft.backbones import load_backbone

    base = load_backbone(runs[0].recipe.backbone)
    info = base_info(base)
    names = [f"run{i}" for i in range(len(runs))]
    try:
        model = PeftModel.from_pretrained(base.model, str(runs[0].adapter), adapter_name=names[0])
        for name, run in zip(names[1:], runs[1:]):
            model.load_adapter(str(run.adapter), adapter_name=name)
        torch.manual_seed(seed)  # DARE's random drops
        model.add_weighted_adapter(names, weights, adapter_name="default", **combination(model, how, density))
    except (ValueError, RuntimeError, KeyError, TypeError) as error:
        raise ExportError(f"peft could not merge these adapters ({how}): {str(error).splitlines()[0]}") from None
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    model.save_pretrained(str(stage))
    return info


def evaluate(backbone: Backbone, runs: list[RunFolder], data: list) -> list[dict]:
    """The merged adapter on each source run's test split, beside that run's own fine-tuned and zero-shot scores."""
    from mmpeft.evaluation import classification_metrics, predict

    rows = []
    for run, splits in zip(runs, data):
        batch_size = run.recipe.eval.batch_size
        truth, predicted = predict(backbone, splits.dataset("test"), splits.labels, batch_size, desc=run.name)
        scores = classification_metrics(truth, predicted, splits.labels.names)
        rows.append({**run_scores(run), "merged": scores["accuracy"], "merged_macro_f1": scores["macro_f1"],
                     "n": scores["n"], "path": str(run.path)})
    return rows


def results_table(rows: list[dict], how: str, weights: list[float], density: float | None) -> str:
    head = f"# Merged adapter ({how}, weights {weights}{f', density {density}' if density is not None else ''})"
    lines = [head, "", "Accuracy on each source run's test split.", "",
             "| run | test images | zero-shot | its own adapter | merged adapter | change | merged macro-F1 |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        zero = f"{row['zero_shot']:.4f}" if row["zero_shot"] is not None else "-"
        lines.append(f"| {row['run']} | {row['n']} | {zero} | {row['test']:.4f} | {row['merged']:.4f} | "
                     f"{row['merged'] - row['test']:+.4f} | {row['merged_macro_f1']:.4f} |")
    return "\n".join(lines) + "\n"
