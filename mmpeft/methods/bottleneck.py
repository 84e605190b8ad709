"""Bottleneck adapters in the encoder layers of the towers: Houlsby (after attention and after the MLP) or Pfeiffer
(after the MLP only). peft has no bottleneck adapter, so this is written here, in the same save/load shape.

Each adapter computes `h + up(act(down(h)))` on a sublayer's output `h`, with `up` zero-initialised: the wrapped
model is exactly the base model at init and the adapter learns a correction. It is attached as a child of the
sublayer (`mlp.adapter`, `self_attn.adapter`) and runs from a forward hook, so the base parameters keep their names
(peft target regexes, checkpoints and exports still match) and the saved state is only the adapters' tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from torch import nn

from mmpeft.core.schema import Range
from mmpeft.methods.base import Method, MethodConfig, freeze, register

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import LabelSet

PLACEMENTS = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",)}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class BottleneckSpec(MethodConfig):
    name: str = "bottleneck"
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    reduction_factor: Annotated[int, Range(ge=1)] = 16  # bottleneck width = hidden size // reduction_factor
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    towers: tuple[Literal["vision", "text"], ...] = ("vision", "text")

    def __post_init__(self) -> None:
        if not self.towers:
            raise ValueError("method.towers must name at least one of: vision, text")


class Adapter(nn.Module):
    """down -> nonlinearity -> up, with `up` zero-initialised so the residual branch starts at exactly zero."""

    def __init__(self, dim: int, width: int, activation: str, device: torch.device | None = None):
        super().__init__()
        self.down = nn.Linear(dim, width, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, dim, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.down.weight.dtype)  # fp32 adapters on a half-precision or k-bit base
        return hidden + self.up(self.act(self.down(x))).to(hidden.dtype)


def _add_adapter(module: nn.Module, inputs: Any, output: Any) -> Any:
    """Forward hook: pass the sublayer's output (the first item of a tuple, for attention) through its adapter."""
    if isinstance(output, tuple):
        return (module.adapter(output[0]), *output[1:])
    return module.adapter(output)


@register
class Bottleneck(Method):
    name = "bottleneck"
    Config = BottleneckSpec
    quantized_bits = (4, 8)
    family_note = " (generative backbones: use lora)"
    variants = {"houlsby": {"placement": "houlsby"}, "pfeiffer": {"placement": "pfeiffer"}}

    def apply(self, backbone: Backbone, config: BottleneckSpec, labels: LabelSet | None = None) -> None:
        freeze(backbone)
        for tower in config.towers:
            dim = backbone.tower_model(tower).config.hidden_size
            width = dim // config.reduction_factor
            if width < 1:
                raise ValueError(f"method.reduction_factor: {config.reduction_factor} leaves no bottleneck for the "
                                 f"{tower} tower's hidden size {dim}; use at most {dim}")
            for layer in backbone.encoder_layers(tower):
                for sublayer_name in PLACEMENTS[config.placement]:
                    sublayer = getattr(layer, sublayer_name)
                    if hasattr(sublayer, "adapter"):
                        raise ValueError(f"{tower} tower: {sublayer_name} already has an adapter; apply once")
                    device = next(layer.parameters()).device
                    sublayer.adapter = Adapter(dim, width, config.activation, device=device)
                    sublayer.register_forward_hook(_add_adapter)

    # save/load: the base shape (the adapters are exactly the trainable tensors); load after `apply`.
