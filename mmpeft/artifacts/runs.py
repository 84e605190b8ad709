"""A finished run folder, checked before any model loads, and its trained model rebuilt (base + apply + load)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mmpeft.backbones import Backbone
from mmpeft.core.io import sha256_file
from mmpeft.core.schema import RecipeError
from mmpeft.data import LabelSet, load_data
from mmpeft.data.conversation_data import CONVERSATION_SOURCES
from mmpeft.methods import METHODS, Method
from mmpeft.methods.base import CONFIG_FILE, STATE_FILE
from mmpeft.runs.build import apply_method, load_base
from mmpeft.runs.folder import ADAPTER_DIR, HASH_FILE, LABELS_FILE, METRICS_FILE, RECIPE_FILE
from mmpeft.runs.recipe import load_recipe
from mmpeft.specs import Recipe

logger = logging.getLogger("mmpeft")

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# What each `Method.saved_format` must have written, besides CONFIG_FILE.
FORMAT_FILES: dict[str, tuple[str, ...]] = {
    "peft": (PEFT_CONFIG, PEFT_WEIGHTS),
    "transformers": ("config.json",),  # + model.safetensors or its sharded index, checked below
    "mmpeft": (STATE_FILE,),
}


class ExportError(ValueError):
    """A run or export folder that cannot be exported, loaded or merged, with what would work instead."""


@dataclass
class RunFolder:
    """A finished run: its resolved recipe, metrics and the method's saved state (`adapter/`)."""

    path: Path
    recipe: Recipe
    metrics: dict
    adapter: Path
    method: Method

    @property
    def format(self) -> str:
        return self.method.saved_format

    @property
    def name(self) -> str:
        return self.path.resolve().name


def read_run(path: str | Path, untrained: bool = False) -> RunFolder:
    """Check a run folder (recipe.yaml, metrics.json, the method's files) and read it; raise ExportError if not.
    `untrained`: a zero-shot run (nothing saved: its model is the base) is read too, for predicting with it."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"run folder {path} does not exist (expected a folder written by `mmpeft run`)")
    if not (path / RECIPE_FILE).is_file():
        raise ExportError(f"{path / RECIPE_FILE} is missing: {path} is not a run folder written by `mmpeft run`")
    if not (path / METRICS_FILE).is_file():
        raise ExportError(f"{path / METRICS_FILE} is missing: the run did not finish; continue it with "
                          f"`mmpeft run --resume {path}`, then export or predict with it")
    try:
        recipe = load_recipe(path / RECIPE_FILE, data_files=False)  # moved data: predict needs none, export says
    except RecipeError as error:
        raise ExportError(f"{path / RECIPE_FILE} no longer loads (export rebuilds the run from it):\n{error}") from None
    try:
        metrics = json.loads((path / METRICS_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ExportError(f"{path / METRICS_FILE} is not valid JSON ({error}); the run folder is damaged") from None
    if not isinstance(metrics, dict):
        raise ExportError(f"{path / METRICS_FILE} holds a JSON {type(metrics).__name__}, not the run's metrics (an "
                          "object); the run folder is damaged")
    method = METHODS.get(recipe.method.name)()
    if not method.trains and untrained:
        return RunFolder(path, recipe, metrics, path / ADAPTER_DIR, method)
    if not method.trains:
        raise ExportError(f"run {path} used method {method.name!r}: nothing was trained, so there is nothing to export;"
                          f" the base model {recipe.backbone.id!r} is the model")
    adapter = path / ADAPTER_DIR
    missing = missing_files(adapter, method.saved_format)
    if missing:
        raise ExportError(f"{adapter}: missing {', '.join(missing)} (method {method.name!r} saves "
                          f"{', '.join(expected_files(method.saved_format))}); the run folder is incomplete or was "
                          f"changed: run it again with `mmpeft run {path / RECIPE_FILE}`")
    check_hashes(adapter)
    check_finite(adapter)
    return RunFolder(path, recipe, metrics, adapter, method)


def check_out_folder(out: str | Path, runs: list[RunFolder]) -> None:
    """Refuse an export or merge folder that cannot be created (a file above it), or that lies inside a run's saved
    state: it would be copied into every later export of that run (and its staging folder into itself)."""
    where = Path(out).resolve()
    above = next(folder for folder in where.parents if folder.exists())
    if not above.is_dir():
        raise ExportError(f"out: {above} is a file, so the folder {out} cannot be created inside it; give another path")
    for run in runs:
        adapter = run.adapter.resolve()
        if where == adapter or adapter in where.parents:
            raise ExportError(f"out: {out} is inside {run.adapter}, the run's saved state, which export copies as it "
                              f"is; write it elsewhere, e.g. {run.path / 'exported'} or a folder outside the run")


def check_hashes(adapter: Path) -> None:
    """The saved state must be the one the run wrote: each file's sha256 against HASH_FILE (written with it)."""
    record = adapter / HASH_FILE
    if not record.is_file():
        logger.warning("%s: no %s (a run from before mmpeft recorded hashes): the saved state cannot be checked "
                       "against the one the run wrote", adapter, HASH_FILE)
        return
    try:
        files = json.loads(record.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ExportError(f"{record} is damaged ({error}); the run folder was changed: run the recipe again") from None
    changed = [name for name, digest in files.items()
               if not (adapter / name).is_file() or sha256_file(adapter / name) != digest]
    if changed:
        raise ExportError(f"{adapter}: {', '.join(changed)} changed after the run saved it (sha256 differs from "
                          f"{HASH_FILE}): these are not the weights the run trained and evaluated; run the recipe "
                          "again rather than exporting them")


def check_finite(adapter: Path) -> None:
    """Refuse a saved state holding NaN or infinity: every output it gives would be NaN."""
    for file, bad in non_finite_tensors(adapter):
        raise ExportError(f"{file}: {len(bad)} tensor(s) hold NaN or infinity ({', '.join(bad[:3])}): the run "
                          "diverged or the file was changed; nothing was exported. Train again with a lower "
                          "train.lr or train.max_grad_norm")


def non_finite_tensors(folder: Path) -> list[tuple[Path, list[str]]]:
    """(file, names of its tensors holding NaN or infinity) for each safetensors file under `folder` that has any."""
    import torch
    from safetensors import SafetensorError, safe_open

    found = []
    for file in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                bad = [key for key in handle.keys() if _not_finite(handle.get_tensor(key), torch)]
        except (SafetensorError, OSError) as error:
            raise ExportError(f"{file} cannot be read ({str(error).splitlines()[0]}): the file is truncated or "
                              "damaged; run the recipe again") from None
        if bad:
            found.append((file, bad))
    return found


def _not_finite(tensor, torch) -> bool:
    return tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())


def expected_files(saved_format: str) -> tuple[str, ...]:
    weights = ("model.safetensors",) if saved_format == "transformers" else ()
    return (*FORMAT_FILES[saved_format], *weights, CONFIG_FILE)


def missing_files(directory: Path, saved_format: str) -> list[str]:
    """Files a method's saved state of `saved_format` must have that `directory` lacks (all, if it is absent)."""
    if not directory.is_dir():
        return [f"the whole folder {directory.name}/"]
    missing = [name for name in (*FORMAT_FILES[saved_format], CONFIG_FILE) if not (directory / name).is_file()]
    if saved_format == "transformers" and not any((directory / n).is_file() for n in
                                                  ("model.safetensors", "model.safetensors.index.json")):
        missing.append("model.safetensors")
    return missing


def rebuild(run: RunFolder, labels: LabelSet, dtype: str | None = None, dequantize: bool = False) -> Backbone:
    """The trained backbone, as the run left it: base (as the recipe loads it) + `apply` + `load` of the saved state.

    `dtype` / `dequantize` load the base in another precision or without its 4/8-bit quantization (for merging).
    """
    changes: dict = {}
    if dtype is not None:
        changes["dtype"] = dtype
    if dequantize:
        changes["quantization"] = None
    recipe = run.recipe.replace(backbone=dataclasses.replace(run.recipe.backbone, **changes))
    backbone = load_base(recipe)
    try:
        apply_method(backbone, recipe, labels, state=run.adapter if run.method.trains else None)
    except (ValueError, RuntimeError, OSError) as error:
        raise ExportError(f"{run.adapter}: the saved state does not fit the base {recipe.backbone.id!r} with method "
                          f"{run.method.name!r}: {str(error).splitlines()[0]}") from None
    return backbone.eval()


def run_data(run: RunFolder):
    """The run's data splits and label set, as `mmpeft run` made them (same recipe, same seed)."""
    return load_data(run.recipe.data, run.recipe.seed)


def run_labels(run: RunFolder) -> LabelSet:
    """The run's label set: recorded in the run folder (runs since labels.json), else rebuilt from its data."""
    path = run.path / LABELS_FILE
    if run.recipe.data.source in CONVERSATION_SOURCES:  # conversations have no classes (answers, or labels given)
        return LabelSet([])
    if not path.is_file():
        return run_data(run).labels
    try:
        return LabelSet.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{path} is damaged ({type(error).__name__}: {error}); remove it to rebuild the label set "
                          "from the run's data") from None
