"""Zero-shot: the backbone as it is, scored against label texts; nothing trains."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmpeft.methods.base import Method, MethodConfig, register

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import LabelSet


@register
class ZeroShot(Method):
    name = "zero_shot"
    trains = False
    families = ("dual_encoder", "generative")
    quantized_bits = (4, 8)

    def apply(self, backbone: Backbone, config: MethodConfig, labels: LabelSet | None = None) -> None:
        backbone.requires_grad_(False)

    def save(self, backbone: Backbone, config: MethodConfig, directory: Path) -> None:
        """Nothing was trained, so there is nothing to save."""

    def load(self, backbone: Backbone, config: MethodConfig, directory: Path) -> None:
        """Nothing to restore."""
