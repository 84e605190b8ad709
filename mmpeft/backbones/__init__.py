"""Backbone families: each module registers a loader `load(spec, path) -> Backbone`; `load_backbone` picks one."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmpeft.registry import Registry

if TYPE_CHECKING:
    from mmpeft.recipe import BackboneSpec

logger = logging.getLogger("mmpeft")

BACKBONES: Registry[Callable] = Registry("backbone family")
DEMO_BACKBONES: Registry[Callable[[], Path]] = Registry("demo backbone")  # name -> builder returning a local dir
FAMILY_MODULES = ("dual_encoder", "generative")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Backbone(torch.nn.Module):
    """What every family wraps: the transformers model (methods may replace it with a peft wrapper), its processor,
    and the hooks methods may set (`head`: logits from image features; `text_prompts`: learned class prompts)."""

    family: str

    def __init__(self, model: torch.nn.Module, processor, name_or_path: str):
        super().__init__()
        self.model = model
        self.processor = processor
        self.name_or_path = name_or_path
        self.model_type = getattr(model.config, "model_type", "unknown")
        self.head: torch.nn.Module | None = None
        self.text_prompts: torch.nn.Module | None = None

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def base_model(self) -> torch.nn.Module:
        """The transformers model under any peft wrapper."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class BackboneError(ValueError):
    """A backbone that cannot be found or used, with what would work instead."""


def resolve_path(spec: BackboneSpec) -> str:
    """A demo name builds (once) into the cache; a local dir or hub id passes through unchanged."""
    _import_families()
    if spec.id in DEMO_BACKBONES:
        return str(DEMO_BACKBONES.get(spec.id)())
    if spec.id.startswith("mmpeft-demo/"):
        raise BackboneError(f"backbone.id: unknown demo backbone {spec.id!r}; demo backbones: "
                            f"{', '.join(DEMO_BACKBONES.names())}")
    return str(Path(spec.id).expanduser()) if Path(spec.id).expanduser().is_dir() else spec.id


def detect_family(path: str, spec: BackboneSpec) -> str:
    if spec.family != "auto":
        return spec.family
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, path, spec)
    architectures = " ".join(getattr(config, "architectures", None) or [])
    generative = "ForConditionalGeneration" in architectures or "ForImageTextToText" in architectures
    family = "generative" if generative else "dual_encoder"
    if family not in BACKBONES:
        raise BackboneError(f"backbone.id {spec.id!r} looks {family}, which this version cannot load; "
                            f"families: {', '.join(BACKBONES.names())}")
    return family


def load_backbone(spec: BackboneSpec):
    path = resolve_path(spec)
    family = detect_family(path, spec)
    return BACKBONES.get(family)(spec, path)


def load_pretrained(model_class, spec: BackboneSpec, path: str):
    """(model, processor) through the Auto classes, with dtype, revision and optional quantization.

    `backbone.init: scratch` builds the architecture from the folder's config with fresh random weights (drawn
    from torch's global generator, which the pipeline seeds) and keeps its processor: pre-training from zero.
    """
    from transformers import AutoConfig, AutoProcessor

    kwargs = {"dtype": DTYPES[spec.dtype]}
    if spec.quantization is not None:
        from mmpeft.quantization import bnb_config

        kwargs["quantization_config"] = bnb_config(spec.quantization)
    if spec.init == "scratch":
        config = _from_pretrained(AutoConfig, path, spec)
        model = model_class.from_config(config, dtype=kwargs["dtype"], trust_remote_code=spec.trust_remote_code)
    else:
        model = _from_pretrained(model_class, path, spec, **kwargs)
    if spec.quantization is not None:
        from mmpeft.quantization import prepare_loaded

        prepare_loaded(model)
    processor = _from_pretrained(AutoProcessor, path, spec)
    return model, processor


def _from_pretrained(cls, path: str, spec: BackboneSpec, **kwargs):
    try:
        return cls.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **kwargs)
    except OSError as error:
        where = "local directory" if Path(path).is_dir() else "hub id (offline here? set HF_HUB_OFFLINE=0 online)"
        raise BackboneError(f"backbone.id {spec.id!r}: could not load {cls.__name__} from {where}: "
                            f"{str(error).splitlines()[0]}") from None


def family_towers(family: str) -> tuple[str, ...] | None:
    """The towers a family's methods can target (its module's TOWER_PATTERNS keys); None for "auto" or unknown."""
    if family not in FAMILY_MODULES:
        return None
    return tuple(importlib.import_module(f"mmpeft.backbones.{family}").TOWER_PATTERNS)


def resolve_towers(family: str, towers: tuple[str, ...] | None) -> tuple[str, ...]:
    """`method.towers` for a family: None -> its DEFAULT_TOWERS (else all), "all" -> every tower; others refused."""
    valid = family_towers(family) or ()
    default = tuple(getattr(importlib.import_module(f"mmpeft.backbones.{family}"), "DEFAULT_TOWERS", valid))
    if towers is None:
        return default
    unknown = [t for t in towers if t != "all" and t not in valid]
    if unknown:
        raise BackboneError(f"method.towers: {', '.join(map(repr, unknown))} is not a tower of {family} backbones; "
                            f"valid: {', '.join(valid)}, all (leave method.towers out for {', '.join(default)})")
    return valid if "all" in towers else tuple(dict.fromkeys(towers))


def _import_families() -> None:
    for module in FAMILY_MODULES:
        importlib.import_module(f"mmpeft.backbones.{module}")
    importlib.import_module("mmpeft.backbones.demo")
