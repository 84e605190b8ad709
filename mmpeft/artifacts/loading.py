"""The manifest of an export folder (what it holds, its base, file hashes) and `load_adapter`, which refuses a folder
whose files are missing or changed, or a base that is not the one the adapter was trained on."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from mmpeft.artifacts.runs import FORMAT_FILES, ExportError
from mmpeft.core.io import write_json

logger = logging.getLogger("mmpeft")

MANIFEST = "mmpeft_export.json"
CARD = "README.md"
# Config fields that fix tensor shapes: a base whose values differ cannot hold the adapter.
SHAPE_FIELDS = ("model_type", "size", "layers", "heads", "vocab", "dim", "patch", "position", "channels")


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file in `directory` (relative names), except the manifest and the editable model card."""
    hashes = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name not in (MANIFEST, CARD):
            hashes[name] = sha256(path)
    return hashes


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def architecture(config) -> dict[str, object]:
    """The shape-defining fields of a transformers config, flattened ("text_config.hidden_size": 512, ...)."""
    found: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        elif prefix.startswith("quantization_config"):
            return
        elif isinstance(value, (int, str)) and any(part in prefix.rsplit(".", 1)[-1] for part in SHAPE_FIELDS):
            found[prefix] = value

    walk("", config.to_dict())
    return found


def write_manifest(directory: Path, manifest: dict) -> dict:
    manifest = {**manifest, "files": file_hashes(directory)}
    write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """The manifest of an export folder, after checking every file it lists is present and unchanged."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"export folder {directory} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} has no {MANIFEST}: it is not a folder written by `mmpeft export` or "
                          f"`mmpeft merge` (for a run folder, export it first: mmpeft export RUN --out DIR)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ExportError(f"{path} is not valid JSON ({error}); the export folder is damaged: export again") from None
    check_manifest(path, manifest)
    missing = [name for name in manifest.get("files", {}) if not (directory / name).is_file()]
    missing += [name for name in FORMAT_FILES[manifest["format"]] if not (directory / name).is_file()]
    if missing:
        raise ExportError(f"{directory}: missing {', '.join(sorted(set(missing)))}; the export folder is incomplete:"
                          " export again")
    changed = [name for name, digest in manifest["files"].items() if sha256(directory / name) != digest]
    if changed:
        raise ExportError(f"{directory}: {', '.join(changed)} changed after export (sha256 differs from "
                          f"{MANIFEST}): the file is corrupted or was edited; export again")
    return manifest


def check_manifest(path: Path, manifest: object) -> None:
    """The fields load_adapter and predict read, of the types they read them as; else the manifest is damaged."""
    if not isinstance(manifest, dict):
        raise ExportError(f"{path} holds a JSON {type(manifest).__name__}, not the export's manifest (an object); the "
                          "export folder is damaged: export again")
    problems = [] if manifest.get("format") in FORMAT_FILES else [
        f"format: {manifest.get('format')!r} is not one of {', '.join(FORMAT_FILES)}"]
    problems += [f"{key}: missing or not an object" for key in ("files", "labels", "backbone", "base", "method")
                 if not isinstance(manifest.get(key), dict)]
    labels = manifest.get("labels")
    if isinstance(labels, dict):
        problems += [f"labels.{key}: missing or not a list" for key in ("keys", "names", "prompts")
                     if not isinstance(labels.get(key), list)]
    if problems:
        raise ExportError(f"{path} is damaged ({'; '.join(problems)}); export again")


def labels_of(manifest: dict):
    """The run's label set as exported (class keys, display names, prompt texts)."""
    from mmpeft.data import LabelSet

    return LabelSet.from_dict(manifest["labels"])


def export_labels(directory: str | Path):
    """The label set an exported model was trained for: score images against `backbone.class_text_features(it)`."""
    return labels_of(read_manifest(directory))


def load_adapter(directory: str | Path, base: str | None = None):
    """An exported folder as a ready mmpeft backbone (`.classify`, `.encode_images`, ...), whatever its format.

    peft format: the base + `PeftModel.from_pretrained`; mmpeft's own format: the base + the method's `apply` and
    `load`; a merged or full model: `from_pretrained` of the folder itself. `base` (hub id or local folder) replaces
    the base recorded in the export, e.g. after moving it; its architecture must match the recorded one.
    """
    from mmpeft.backbones import load_backbone
    from mmpeft.core.schema import build
    from mmpeft.specs import BackboneSpec

    directory = Path(directory)
    manifest = read_manifest(directory)
    problems: list[str] = []
    spec = build(BackboneSpec, manifest["backbone"], "backbone", problems)
    if problems:
        raise ExportError(f"{directory / MANIFEST}: backbone does not load: {'; '.join(problems)}")
    if manifest["format"] == "transformers":
        if base is not None:
            raise ExportError(f"{directory} holds a complete model (method folded in), so it takes no base; "
                              "call load_adapter(directory) alone")
        import dataclasses

        spec = dataclasses.replace(spec, id=str(directory), quantization=None, init="pretrained",
                                   dtype=manifest.get("dtype", spec.dtype))
        return _with_task(load_backbone(spec), manifest).eval()
    spec = _with_base(spec, manifest, base, directory)
    backbone = _with_task(load_backbone(spec), manifest)
    check_base(manifest, backbone.base_model.config, spec.id, directory)
    if manifest["format"] == "peft":
        from peft import PeftModel

        try:
            backbone.model = PeftModel.from_pretrained(backbone.model, str(directory))
        except (RuntimeError, ValueError, KeyError) as error:
            raise ExportError(f"{directory}: the peft adapter does not fit base {spec.id!r}: "
                              f"{str(error).splitlines()[0]}") from None
    else:
        _apply_own_format(backbone, manifest, directory, spec.id)
    return backbone.eval()


def _with_task(backbone, manifest: dict):
    """A generative backbone asks the exported question and scores the exported answer template."""
    if manifest.get("task"):
        backbone.apply_task_settings(manifest["task"])
    return backbone


def _with_base(spec, manifest: dict, base: str | None, directory: Path):
    import dataclasses

    if base is None:
        base = manifest["base"]["id"]
        looks_local = base.startswith((".", "/", "~"))
        if looks_local and not Path(base).expanduser().is_dir():
            raise ExportError(f"the base recorded in {directory / MANIFEST}, {base!r}, is not on this machine; "
                              "pass load_adapter(directory, base=HUB_ID_OR_FOLDER) (mmpeft predict: --base) with the "
                              "same model")
    elif base != manifest["base"]["id"]:
        logger.info("loading %s onto base %s (trained on %s)", directory, base, manifest["base"]["id"])
    if manifest["backbone"].get("init") == "scratch":
        raise ExportError(f"{directory} was trained on a randomly initialised base (backbone.init: scratch), "
                          "which exists nowhere on disk; export that run with --merge instead")
    return dataclasses.replace(spec, id=base)


def check_base(manifest: dict, config, given: str, directory: Path) -> None:
    """Refuse a base whose shape-defining config fields differ from those of the base the adapter was trained on."""
    recorded, found = manifest["base"]["architecture"], architecture(config)
    differ = [f"{key}: {recorded.get(key)!r} (trained) vs {found.get(key)!r} (given)"
              for key in sorted(set(recorded) | set(found)) if recorded.get(key) != found.get(key)]
    if differ:
        raise ExportError(f"{directory} was trained on base {manifest['base']['id']!r}, but the base "
                          f"{given!r} has another architecture ({'; '.join(differ[:4])}"
                          f"{'; ...' if len(differ) > 4 else ''}); pass the base it was trained on")


def _apply_own_format(backbone, manifest: dict, directory: Path, base: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mmpeft.core.schema import build
    from mmpeft.methods import METHODS
    from mmpeft.methods.base import STATE_FILE

    name = manifest["method"]["name"]
    if name not in METHODS:
        raise ExportError(f"{directory}: method {name!r} is not in this mmpeft version; methods: "
                          f"{', '.join(METHODS.names())}")
    method = METHODS.get(name)()
    problems: list[str] = []
    config = build(method.Config, manifest["method"], "method", problems)
    if problems:
        raise ExportError(f"{directory / MANIFEST}: method does not load: {'; '.join(problems)}")
    method.apply(backbone, config, labels_of(manifest))
    try:
        state = load_file(str(directory / STATE_FILE))
    except (SafetensorError, OSError) as error:
        raise ExportError(f"{directory / STATE_FILE} does not read as safetensors ({error}); export again") from None
    params = dict(backbone.named_parameters())
    wrong = [f"{key} {tuple(value.shape)} (saved) vs {tuple(params[key].shape)} (base {base!r})"
             for key, value in state.items() if key in params and params[key].shape != value.shape]
    if wrong:
        raise ExportError(f"{directory}: saved tensors do not fit the base: {'; '.join(wrong[:3])}")
    try:
        method.load(backbone, config, directory)
    except ValueError as error:
        raise ExportError(f"{directory}: {error}") from None
