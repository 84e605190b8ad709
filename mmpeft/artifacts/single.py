"""`export(run_dir, out)`: one run as a merged model (the method folded into the base weights) or as its adapter
alone, staged beside `out`, verified against the trained model, and only then renamed into place."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mmpeft.artifacts.card import model_card
from mmpeft.artifacts.loading import CARD, architecture, load_adapter, write_manifest
from mmpeft.artifacts.runs import ExportError, RunFolder, check_out_folder, read_run, rebuild, run_data
from mmpeft.artifacts.verify import DEFAULT_TOLERANCE, check, differences, make_probe, outputs
from mmpeft.core import VERSION
from mmpeft.core.dtypes import DTYPES
from mmpeft.core.io import atomic_dir, write_text
from mmpeft.core.schema import to_plain
from mmpeft.methods.base import CannotMerge
from mmpeft.runs.folder import HASH_FILE
from mmpeft.runs.single import NOT_TESTED

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone

logger = logging.getLogger("mmpeft")

How = Literal["auto", "merged", "adapter"]
HOWS = ("auto", "merged", "adapter")


def export(run_dir: str | Path, out: str | Path, how: How = "auto", dtype: str | None = None, verify: bool = True,
           tolerance: float | None = None, onnx: bool = False) -> dict:
    """Export a finished run; returns the manifest written to `out/mmpeft_export.json`.

    how: "merged" folds the method into the base weights (a plain transformers model) and refuses a method that
    cannot fold; "adapter" exports the trained state alone; "auto" merges when the method can, else exports the
    adapter and says why. dtype: the merged model's precision (default: the run's). verify: reload from disk and
    compare outputs with the trained model on a fixed batch; above `tolerance` (default by dtype, see
    verify.DEFAULT_TOLERANCE) the export fails and `out` is not created.
    """
    if how not in HOWS:
        raise ExportError(f"how: {how!r} is not one of {', '.join(HOWS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0 <= tolerance < math.inf):
        raise ExportError(f"tolerance: {tolerance!r} must be a finite number >= 0 (the largest relative difference "
                          "accepted; default by dtype: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TOLERANCE.items())
                          + ")")
    run = read_run(run_dir)
    check_out_folder(out, [run])
    if how == "adapter" and dtype not in (None, run.recipe.backbone.dtype):
        raise ExportError(f"dtype: {dtype!r} applies to merged exports only; an adapter keeps the dtype it was "
                          f"trained in ({run.recipe.backbone.dtype})")
    if onnx and how == "adapter":
        raise ExportError("onnx: the ONNX towers are exported from the merged model; use how='merged' (--merge)")
    if how != "adapter" and run.method.merge_blocker:
        if how == "merged":
            raise ExportError(cannot_merge_message(run, run.method.merge_blocker))
        print(f"note: {cannot_merge_message(run, run.method.merge_blocker)}; exporting the adapter alone", flush=True)
        how = "adapter"
    dtype = dtype or run.recipe.backbone.dtype
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else float(tolerance)
    out = Path(out)
    with atomic_dir(out) as stage:
        data = run_data(run)
        manifest = None
        if how != "adapter":
            try:
                manifest = export_merged(run, data, stage, dtype, verify, tolerance, out)
            except CannotMerge as error:
                if how == "merged" or onnx:
                    raise ExportError(cannot_merge_message(run, str(error))) from None
                print(f"note: {cannot_merge_message(run, str(error))}; exporting the adapter alone", flush=True)
                for path in stage.iterdir():
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        if manifest is None:
            manifest = export_adapter(run, data, stage, verify, tolerance, out)
        if onnx:
            from mmpeft.artifacts.onnx_towers import export_towers

            manifest["onnx"] = export_towers(stage, make_probe(data), tolerance, str(out))
        manifest = write_manifest(stage, manifest)
        kind = "merged model" if manifest["kind"] == "merged" else f"adapter ({manifest['format']} format)"
        write_text(stage / CARD, model_card(manifest, f"{run.name}: {kind}"))
    size = manifest["size_bytes"] / 2**20
    print(f"exported {kind}: {out} ({size:.2f} MiB)", flush=True)
    return {**manifest, "out": str(out)}


def cannot_merge_message(run: RunFolder, reason: str) -> str:
    return (f"run {run.path}: method {run.method.name!r} cannot be merged into the base weights: it {reason}. "
            f"Alternatives: export its trained state with `mmpeft export {run.path} --adapter-only --out DIR` "
            "(mmpeft.artifacts.load_adapter(DIR) loads it), or train with a method that folds into the weights "
            "(README: Export)")


def export_merged(run: RunFolder, data, stage: Path, dtype: str, verify: bool, tolerance: float, out: Path) -> dict:
    """Base + method folded together, saved with its processor; a 4/8-bit run folds into an unquantised base."""
    spec = run.recipe.backbone
    probe = make_probe(data)
    trained = rebuild(run, data.labels)
    base = base_info(trained)
    trained_out = outputs(trained, probe) if verify else None
    notes = []
    if spec.quantization is not None or dtype != spec.dtype:
        del trained  # one model in memory at a time
        model = rebuild(run, data.labels, dtype=dtype, dequantize=True)
        reference = outputs(model, probe) if verify else None
    else:
        model, reference = trained, trained_out
    run.method.merge(model, run.recipe.method)
    plain = model.model
    if hasattr(plain, "peft_config") or not hasattr(plain, "save_pretrained"):
        raise ExportError(f"method {run.method.name!r}: merge() left a {type(plain).__name__}, not a plain "
                          "transformers model; this is a bug in the method's merge")
    plain.save_pretrained(stage)
    model.processor.save_pretrained(stage)
    check_pipeline_files(stage, base["family"], out)
    size = sum(p.stat().st_size for p in stage.glob("*.safetensors"))
    parameters = sum(p.numel() for p in plain.parameters())
    del model, plain
    manifest = manifest_for(run, data, "merged", "transformers", base, None, size, dtype, notes, parameters=parameters)
    verification = None
    if verify:
        write_manifest(stage, manifest)  # reloaded as a user would: load_adapter, the run's task applied
        exported = outputs(load_adapter(stage), probe)
        verification = check(differences(reference, exported), tolerance, f"merged model {out}")
        if reference is not trained_out:
            verification["vs_trained_run"] = differences(trained_out, exported)["max"]
    if spec.quantization is not None:
        bits = spec.quantization.bits
        trained_bytes = run.metrics.get("memory", {}).get("weights_bytes")
        note = (f"trained on a {bits}-bit base; merged into the base reloaded unquantised in {dtype}: "
                f"{size / 2**20:.2f} MiB of weights")
        if trained_bytes:
            note += f" (the {bits}-bit model took {trained_bytes / 2**20:.2f} MiB)"
        if verification:
            note += (f"; its outputs differ from the {bits}-bit trained model by up to "
                     f"{verification['vs_trained_run']:.3g}: the base's quantisation error, not an export error")
        notes.append(note)
        print(f"note: {note}", flush=True)
    elif dtype != spec.dtype and verification:
        notes.append(f"trained in {spec.dtype}, exported in {dtype}: outputs differ from the trained model by up to "
                     f"{verification['vs_trained_run']:.3g}")
    return {**manifest, "verification": verification, "notes": notes}


# What transformers' pipelines need beside the weights: each tuple holds alternatives.
PIPELINE_FILES = {
    "image processor": ("preprocessor_config.json", "processor_config.json"),
    "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json"),
    "tokenizer config": ("tokenizer_config.json",),
}
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def check_pipeline_files(stage: Path, family: str, out: Path) -> None:
    """Refuse a merged folder that `transformers.pipeline(..., model=out)` could not use: without tokenizer files a
    pipeline silently builds an empty tokenizer, without a chat template a generative one cannot build prompts."""
    missing = [f"{what} ({' or '.join(names)})" for what, names in PIPELINE_FILES.items()
               if not any((stage / name).is_file() for name in names)]
    if family == "generative" and not any((stage / name).is_file() for name in CHAT_TEMPLATE_FILES):
        config = stage / "tokenizer_config.json"
        if not (config.is_file() and "chat_template" in json.loads(config.read_text())):
            missing.append(f"chat template ({' or '.join(CHAT_TEMPLATE_FILES)})")
    if missing:
        raise ExportError(f"merged model {out}: the processor saved no {', '.join(missing)}; transformers pipelines "
                          "need them to load the folder. Save the base's processor with them (processor."
                          "save_pretrained) and export again; nothing was written")


def export_adapter(run: RunFolder, data, stage: Path, verify: bool, tolerance: float, out: Path) -> dict:
    """The run's saved state as it is (peft format for peft methods), with a manifest and a model card."""
    if run.recipe.backbone.init == "scratch" and run.format != "transformers":
        raise ExportError(f"run {run.path} trained on a randomly initialised base (backbone.init: scratch) that "
                          "exists nowhere on disk, so its adapter alone cannot be loaded; export it with --merge")
    for path in run.adapter.iterdir():
        if path.name == HASH_FILE:  # the run's own record; the export's manifest describes the export
            continue
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, stage / path.name)
    trained = rebuild(run, data.labels)
    size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    manifest = manifest_for(run, data, "adapter", run.format, base_info(trained), None, size,
                            run.recipe.backbone.dtype, [])
    if verify:
        write_manifest(stage, manifest)  # load_adapter reads it, as a user's load would
        probe = make_probe(data)
        loaded = load_adapter(stage)
        manifest["verification"] = check(differences(outputs(trained, probe), outputs(loaded, probe)), tolerance,
                                         f"adapter {out}")
    return manifest


def base_info(backbone: Backbone) -> dict:
    """What identifies the base: its family, model type and shape-defining config fields (see load_adapter)."""
    config = backbone.base_model.config
    return {"family": backbone.family, "model_type": getattr(config, "model_type", "unknown"),
            "architecture": architecture(config)}


def manifest_for(run: RunFolder, data, kind: str, fmt: str, base: dict, verification: dict | None, size: int,
                 dtype: str, notes: list[str], **extra) -> dict:
    """What load_adapter and the model card need: base, method, labels, data, scores, checks."""

    labels = data.labels
    info = run.metrics.get("data", {})
    return {
        "mmpeft_version": VERSION, "kind": kind, "format": fmt, "source_runs": [str(run.path.resolve())],
        "method": to_plain(run.recipe.method), "backbone": to_plain(run.recipe.backbone),
        "base": {"id": run.recipe.backbone.id, **base},
        "labels": labels.to_dict(),
        "data": {k: info.get(k) for k in ("source", "where", "classes", "counts")},
        "metrics": [run_scores(run)], "dtype": dtype, "size_bytes": size, "verification": verification,
        "notes": notes, "task": generative_task(run.recipe) if base.get("family") == "generative" else None,
        "templates": list(run.recipe.data.templates), **extra,
    }


def generative_task(recipe) -> dict:
    """How a generative model is asked (question, answer template, scoring); the loader sets it back."""
    return {"question": recipe.data.question, "answer_template": recipe.data.answer_template,
            "length_normalize": recipe.eval.length_normalize, "max_new_tokens": recipe.eval.max_new_tokens}


def run_scores(run: RunFolder, tested: bool = False) -> dict:
    """The run's test (and zero-shot) scores for the model card; `tested`: refuse a run not tested (merge compares
    with them), else such a run's card has none."""
    metrics = run.metrics
    test = metrics.get("test")
    if isinstance(test, dict) and test.get("skipped") == NOT_TESTED:
        if tested:
            raise ExportError(f"run {run.path} was not tested (eval.test: false): merge compares the merged adapter "
                              "with each run's own test scores; run it again with eval.test: true")
        return {"run": run.name, "zero_shot": (metrics.get("zero_shot") or {}).get("accuracy"), "test": None,
                "test_macro_f1": None}
    retrieval = metrics.get("retrieval") or {}
    if isinstance(test, dict) and "skipped" in test and isinstance(retrieval.get("test"), dict):
        return {"run": run.name, **caption_only_scores(retrieval)}  # caption-only data: retrieval, no classes
    if not isinstance(test, dict) or not all(isinstance(test.get(k), (int, float)) for k in ("accuracy", "macro_f1")):
        raise ExportError(f"{run.path / 'metrics.json'} has no test accuracy and macro_f1 (the model card and merge "
                          "table report them); the run folder is damaged or did not finish its evaluation")
    return {"run": run.name, "zero_shot": (metrics.get("zero_shot") or {}).get("accuracy"),
            "test": metrics["test"]["accuracy"], "test_macro_f1": metrics["test"]["macro_f1"]}


def caption_only_scores(retrieval: dict) -> dict:
    """Image->text R@1 of a caption-only run (no classes: accuracy was not computed), after and before training."""
    def r1(stage: str):
        return ((retrieval.get(stage) or {}).get("image_to_text") or {}).get("R@1")

    return {"zero_shot": None, "test": None, "test_macro_f1": None, "test_retrieval_r1": r1("test"),
            "zero_shot_retrieval_r1": r1("zero_shot")}
