"""(IA)^3 through peft: learned per-channel scales on key/value outputs and on the MLP's inner activations.

Fewer parameters than LoRA (one vector per targeted layer), initialised to ones, so the model starts as the base.
Which modules to scale comes from the backbone (`default_ia3_targets`), per tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mmpeft.methods.base import MethodConfig, register
from mmpeft.methods.lora import PeftMethod, peft_targets

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone


@dataclass(frozen=True)
class IA3Spec(MethodConfig):
    name: str = "ia3"
    towers: tuple[Literal["vision", "text"], ...] = ("vision", "text")
    target_modules: tuple[str, ...] | None = None  # override: module names or one regex (default: k, v, fc2)
    feedforward_modules: tuple[str, ...] | None = None  # targets whose input (not output) is scaled; needs the above

    def __post_init__(self) -> None:
        if not self.towers:
            raise ValueError("method.towers must name at least one of: vision, text")
        if self.feedforward_modules is not None and self.target_modules is None:
            raise ValueError("method.feedforward_modules is set but method.target_modules is not: the default "
                             "targets already choose their feedforward modules; set both or neither")


@register
class IA3(PeftMethod):
    name = "ia3"
    Config = IA3Spec
    families = ("dual_encoder",)
    family_note = " (generative backbones: use lora)"

    def peft_config(self, backbone: Backbone, config: IA3Spec):
        from peft import IA3Config

        if config.target_modules is None:
            targets, feedforward = backbone.default_ia3_targets(config.towers)
        else:
            targets = peft_targets(config.target_modules)
            feedforward = peft_targets(config.feedforward_modules) if config.feedforward_modules else []
        return IA3Config(target_modules=targets, feedforward_modules=feedforward)
