"""LoRA through peft; targets come from the backbone (which modules of which tower), never per-backbone code here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from mmpeft.io import write_json
from mmpeft.methods.base import CONFIG_FILE, Method, MethodConfig, register
from mmpeft.schema import to_plain


@dataclass(frozen=True)
class LoraSpec(MethodConfig):
    name: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    towers: tuple[Literal["vision", "text"], ...] = ("vision", "text")
    target_modules: tuple[str, ...] | None = None  # module names or one regex; default: attention projections
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"method.r must be >= 1, got {self.r}")
        if not self.towers:
            raise ValueError("method.towers must name at least one of: vision, text")


@register
class Lora(Method):
    name = "lora"
    Config = LoraSpec
    families = ("dual_encoder", "generative")

    def peft_config(self, backbone: nn.Module, config: LoraSpec):
        from peft import LoraConfig

        targets = config.target_modules
        if targets is None:
            targets = backbone.default_lora_targets(config.towers)
        elif len(targets) == 1:
            targets = targets[0]  # a single string is a regex for peft
        else:
            targets = list(targets)
        return LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                          bias=config.bias, use_dora=config.use_dora, use_rslora=config.use_rslora)

    def apply(self, backbone: nn.Module, config: LoraSpec) -> None:
        from peft import get_peft_model

        backbone.requires_grad_(False)
        try:
            backbone.model = get_peft_model(backbone.model, self.peft_config(backbone, config))
        except ValueError as error:
            raise ValueError(f"method.target_modules: {error}") from None

    def save(self, backbone: nn.Module, config: LoraSpec, directory: Path) -> None:
        """peft's own format: `PeftModel.from_pretrained(base, directory)` loads it."""
        backbone.model.save_pretrained(directory)
        write_json(directory / CONFIG_FILE, {"method": to_plain(config), "base": backbone.name_or_path})

    def load(self, backbone: nn.Module, config: LoraSpec, directory: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(backbone.model, load_file(str(directory / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise ValueError(f"adapter in {directory} does not match this backbone: {result.unexpected_keys[:3]}")
