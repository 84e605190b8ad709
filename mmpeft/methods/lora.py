"""LoRA, DoRA and rsLoRA through peft; targets come from the backbone (which modules of which tower), never per-backbone
code here. `PeftMethod` is the save/load shape every peft-backed method shares (IA3 too)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from mmpeft.backbones import family_towers, resolve_towers
from mmpeft.backbones.quantization import cuda_available
from mmpeft.core.io import write_json
from mmpeft.core.schema import Range, to_plain
from mmpeft.methods.base import CONFIG_FILE, Method, MethodConfig, freeze, register

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import LabelSet
    from mmpeft.specs import Recipe


@dataclass(frozen=True)
class LoraSpec(MethodConfig):
    name: str = "lora"
    r: Annotated[int, Range(ge=1)] = 8
    alpha: Annotated[float, Range(gt=0)] = 16.0
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    # dual_encoder: vision, text (default both); generative: language (default), vision, projector; "all": every one
    towers: tuple[Literal["vision", "text", "language", "projector", "all"], ...] | None = None
    target_modules: tuple[str, ...] | None = None  # module names or one regex; default: attention projections
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output, LoRA on the direction
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r: steadier as r grows

    def __post_init__(self) -> None:
        if self.towers is not None and not self.towers:
            raise ValueError("method.towers must name at least one tower, or be left out for the family's default")


def peft_targets(targets: tuple[str, ...]) -> str | list[str]:
    """A single string is a regex for peft (full match); several are module-name suffixes."""
    return targets[0] if len(targets) == 1 else list(targets)


class PeftMethod(Method):
    """A method peft implements: wrap `backbone.model` in a PeftModel; save and load in peft's own format."""

    families = ("dual_encoder", "generative")
    quantized_bits = (4, 8)
    saved_format = "peft"  # merged exports use peft's merge_and_unload (the default Method.merge)

    def peft_config(self, backbone: Backbone, config: MethodConfig):
        raise NotImplementedError

    def apply(self, backbone: Backbone, config: MethodConfig, labels: LabelSet | None = None) -> None:
        from peft import get_peft_model

        freeze(backbone)
        peft_config = self.peft_config(backbone, config)  # its own errors name their field (method.towers)
        try:
            backbone.model = get_peft_model(backbone.model, peft_config)
        except ValueError as error:
            raise ValueError(f"method.target_modules: {error}") from None

    def save(self, backbone: Backbone, config: MethodConfig, directory: Path) -> None:
        """peft's own format: `PeftModel.from_pretrained(base, directory)` loads it without mmpeft."""
        backbone.model.save_pretrained(directory)
        write_json(directory / CONFIG_FILE, {"method": to_plain(config), "base": backbone.name_or_path})

    def load(self, backbone: Backbone, config: MethodConfig, directory: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(backbone.model, load_file(str(directory / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise ValueError(f"adapter in {directory} does not match this backbone: {result.unexpected_keys[:3]}")


@register
class Lora(PeftMethod):
    name = "lora"
    Config = LoraSpec
    variants = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}

    @classmethod
    def check(cls, recipe: Recipe, cuda: bool | None = None) -> list[str]:
        problems = super().check(recipe, cuda)
        quant = recipe.backbone.quantization
        cuda = cuda_available() if cuda is None else cuda
        if recipe.method.use_dora and quant is not None and quant.bits == 8 and not cuda:
            problems.append("method.use_dora: true on an 8-bit backbone needs CUDA: bitsandbytes 0.50's CPU backend "
                            "loses the int8 scales when peft dequantizes the weight for DoRA; on CPU use "
                            "backbone.quantization.bits: 4, or method.use_dora: false")
        if recipe.method.target_modules is None and family_towers(recipe.backbone.family) is not None:
            try:  # family "auto": checked when the backbone is loaded
                resolve_towers(recipe.backbone.family, recipe.method.towers)
            except ValueError as error:
                problems.append(str(error))
        problems += generative_tower_problems(recipe)
        return problems

    def peft_config(self, backbone: Backbone, config: LoraSpec):
        from peft import LoraConfig

        targets = config.target_modules
        if targets is None:
            targets = backbone.default_lora_targets(resolve_towers(backbone.family, config.towers))
        else:
            targets = peft_targets(targets)
        return LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                          bias=config.bias, use_dora=config.use_dora, use_rslora=config.use_rslora)


def generative_tower_problems(recipe: Recipe) -> list[str]:
    """Towers of a generative backbone without linear layers (Gemma3's projector), from its config alone."""
    from mmpeft.backbones.generative import GenerativeBackbone

    family, towers = recipe.backbone.family, recipe.method.towers
    if recipe.method.target_modules is not None or towers is None or family not in ("generative", "auto"):
        return []
    try:
        towers = resolve_towers("generative", towers)
    except ValueError:  # not generative towers: a dual encoder's, or already reported above
        return []
    return GenerativeBackbone.recipe_tower_problems(recipe.backbone, towers)
