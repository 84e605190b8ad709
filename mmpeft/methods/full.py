"""Full fine-tuning: every backbone parameter trains; saved as a complete transformers model folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mmpeft.core.io import write_json
from mmpeft.core.schema import to_plain
from mmpeft.methods.base import CONFIG_FILE, Method, MethodConfig, register

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import LabelSet


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    name: str = "full"
    towers: tuple[Literal["vision", "text"], ...] = ("vision", "text")


@register
class Full(Method):
    name = "full"
    Config = FullConfig
    families = ("dual_encoder", "generative")
    quantized_note = "it updates every weight, and quantized weights are frozen integer codes"
    saved_format = "transformers"  # already a complete model: a merged export has nothing to fold

    def apply(self, backbone: Backbone, config: FullConfig, labels: LabelSet | None = None) -> None:
        backbone.requires_grad_(False)
        patterns = [re.compile(backbone.tower_pattern(t)) for t in config.towers]
        for name, param in backbone.model.named_parameters():
            if set(config.towers) == {"vision", "text"} or any(p.search(name) for p in patterns):
                param.requires_grad_(True)

    def save(self, backbone: Backbone, config: FullConfig, directory: Path) -> None:
        """A complete model folder: `from_pretrained(directory)` loads it without mmpeft."""
        backbone.model.save_pretrained(directory)
        backbone.processor.save_pretrained(directory)
        write_json(directory / CONFIG_FILE, {"method": to_plain(config), "base": backbone.name_or_path})

    def load(self, backbone: Backbone, config: FullConfig, directory: Path) -> None:
        trained = type(backbone.model).from_pretrained(directory, dtype=backbone.model.dtype)
        backbone.model.load_state_dict(trained.state_dict())
