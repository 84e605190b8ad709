"""Linear probe: the backbone stays frozen and a linear head maps image features to class logits.

By default the head starts as the zero-shot classifier (weights = class text features x logit scale, bias = the
model's logit bias), so the probe begins at zero-shot accuracy instead of chance, and its logits equal the zero-shot
logits exactly until it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from mmpeft.methods.base import Method, MethodConfig, freeze, register, require_labels

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import LabelSet


@dataclass(frozen=True)
class LinearProbeSpec(MethodConfig):
    name: str = "linear_probe"
    init: Literal["zero_shot", "zeros"] = "zero_shot"


@register
class LinearProbe(Method):
    name = "linear_probe"
    Config = LinearProbeSpec
    quantized_bits = (4, 8)
    family_note = " (generative backbones: use lora)"

    def apply(self, backbone: Backbone, config: LinearProbeSpec, labels: LabelSet | None = None) -> None:
        labels = require_labels(self.name, labels, "the head has one output per class")
        freeze(backbone)
        with torch.no_grad():
            text = backbone.class_text_features(labels)  # [classes, dim]; also fixes the feature size
            head = nn.Linear(text.shape[1], text.shape[0], device=text.device)
            if config.init == "zero_shot":
                head.weight.copy_(text * backbone.logit_scale())
                head.bias.fill_(float(backbone.logit_bias()))
            else:
                head.weight.zero_()
                head.bias.zero_()
        backbone.head = head

    # save/load: the base shape (head.weight, head.bias); load after `apply` with the same label set.
