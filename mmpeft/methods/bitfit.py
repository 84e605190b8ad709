"""BitFit: only the bias terms of the chosen towers train (optionally LayerNorm scales too); nothing is added.

Biases stay full precision in bitsandbytes' 4/8-bit linear layers and receive gradients there, so BitFit also
runs on a quantized base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from mmpeft.methods.base import Method, MethodConfig, freeze, register

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import LabelSet


@dataclass(frozen=True)
class BitFitSpec(MethodConfig):
    name: str = "bitfit"
    towers: tuple[Literal["vision", "text"], ...] = ("vision", "text")
    layer_norm: bool = False  # also train LayerNorm weights (their biases train anyway)

    def __post_init__(self) -> None:
        if not self.towers:
            raise ValueError("method.towers must name at least one of: vision, text")


def is_bias(name: str) -> bool:
    """`bias`, and fused ones such as nn.MultiheadAttention's `in_proj_bias`; not `logit_bias` (not in a tower)."""
    return name == "bias" or name.endswith("_bias")


@register
class BitFit(Method):
    name = "bitfit"
    Config = BitFitSpec
    quantized_bits = (4, 8)
    family_note = " (generative backbones: use lora)"

    def apply(self, backbone: Backbone, config: BitFitSpec, labels: LabelSet | None = None) -> None:
        freeze(backbone)
        towers = [re.compile(backbone.tower_pattern(t)) for t in config.towers]
        for module_name, module in backbone.model.named_modules():
            if not any(p.search(module_name) for p in towers):
                continue
            for name, param in module.named_parameters(recurse=False):
                layer_norm = config.layer_norm and isinstance(module, nn.LayerNorm) and name == "weight"
                if is_bias(name) or layer_norm:
                    param.requires_grad_(True)
        if not any(p.requires_grad for p in backbone.parameters()):
            raise ValueError(f"method.towers: {list(config.towers)} hold no bias terms in this backbone")

    # save/load: the base shape (exactly the biases and norm scales that trained); load after `apply`.
