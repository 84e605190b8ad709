"""Backbone families: each module defines a Backbone subclass registered in BACKBONES; `load_backbone` picks one.

Adding a family is one module plus one line in the import list below.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import mmpeft.backbones.dual_encoder  # noqa: F401  (registers "dual_encoder")
import mmpeft.backbones.generative  # noqa: F401  (registers "generative")
from mmpeft.backbones.base import BACKBONES, DEMO_BACKBONES, Backbone, BackboneError
from mmpeft.backbones.loading import from_pretrained

if TYPE_CHECKING:
    from mmpeft.specs import BackboneSpec

__all__ = ["BACKBONES", "DEMO_BACKBONES", "Backbone", "BackboneError", "config_family", "detect_family",
           "family_towers", "load_backbone", "resolve_path", "resolve_towers"]


def resolve_path(spec: BackboneSpec) -> str:
    """A demo name builds (once) into the cache; a local dir or hub id passes through unchanged."""
    if spec.id in DEMO_BACKBONES:
        return str(DEMO_BACKBONES.get(spec.id)())
    if spec.id.startswith("mmpeft-demo/"):
        raise BackboneError(f"backbone.id: unknown demo backbone {spec.id!r}; demo backbones: "
                            f"{', '.join(DEMO_BACKBONES.names())}")
    return str(Path(spec.id).expanduser()) if Path(spec.id).expanduser().is_dir() else spec.id


def config_family(config: Any) -> str:
    """What a model config describes, by its architectures: an image-text-to-text model or a dual encoder."""
    architectures = " ".join(getattr(config, "architectures", None) or [])
    generative = "ForConditionalGeneration" in architectures or "ForImageTextToText" in architectures
    return "generative" if generative else "dual_encoder"


def detect_family(path: str, spec: BackboneSpec) -> str:
    if spec.family != "auto":
        return spec.family
    from transformers import AutoConfig

    family = config_family(from_pretrained(AutoConfig, path, spec))
    if family not in BACKBONES:
        raise BackboneError(f"backbone.id {spec.id!r} looks {family}, which this version cannot load; "
                            f"families: {', '.join(BACKBONES.names())}")
    return family


def load_backbone(spec: BackboneSpec) -> Backbone:
    path = resolve_path(spec)
    family = detect_family(path, spec)
    return BACKBONES.get(family).load(spec, path)


def family_towers(family: str) -> tuple[str, ...] | None:
    """The towers a family's methods can target (its class's TOWER_PATTERNS keys); None for "auto" or unknown."""
    if family not in BACKBONES:
        return None
    return tuple(BACKBONES.get(family).TOWER_PATTERNS)


def resolve_towers(family: str, towers: tuple[str, ...] | None) -> tuple[str, ...]:
    """`method.towers` for a family: None -> its DEFAULT_TOWERS (else all), "all" -> every tower; others refused."""
    valid = family_towers(family) or ()
    default = BACKBONES.get(family).DEFAULT_TOWERS if family in BACKBONES else valid
    if towers is None:
        return default
    unknown = [t for t in towers if t != "all" and t not in valid]
    if unknown:
        raise BackboneError(f"method.towers: {', '.join(map(repr, unknown))} is not a tower of {family} backbones; "
                            f"valid: {', '.join(valid)}, all (leave method.towers out for {', '.join(default)})")
    return valid if "all" in towers else tuple(dict.fromkeys(towers))
