"""The shape every method has: a config dataclass, `apply` to a backbone, and save/load of its own trainable state."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from safetensors.torch import load_file, save_file
from torch import nn

from mmpeft.backbones import quantization
from mmpeft.core.io import atomic_path, write_json
from mmpeft.core.registry import Registry
from mmpeft.core.schema import to_plain

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import LabelSet
    from mmpeft.specs import Recipe

STATE_FILE = "trainable.safetensors"
CONFIG_FILE = "method.json"


@dataclass(frozen=True)
class MethodConfig:
    name: str


class Method:
    """Default behaviour: train whatever `apply` left with requires_grad; save exactly those tensors."""

    name: ClassVar[str]
    Config: ClassVar[type] = MethodConfig
    trains: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = ("dual_encoder",)
    family_note: ClassVar[str] = ""  # appended to the refusal for another family (what to use instead, what is planned)
    quantized_bits: ClassVar[tuple[int, ...]] = ()  # 4/8: the method can train on a bitsandbytes-quantized base
    quantized_note: ClassVar[str] = "its layers cannot sit on quantized weights"
    variants: ClassVar[dict[str, dict]] = {}  # named settings of the config, one row each in the support table
    # What `save` writes, so export can check a run folder and pick the loader: "mmpeft" (STATE_FILE, the default
    # save), "peft" (adapter_config.json + adapter_model.safetensors) or "transformers" (a complete model folder).
    saved_format: ClassVar[Literal["mmpeft", "peft", "transformers"]] = "mmpeft"
    # Why the trained state can never fold into the base weights (shown by `mmpeft export --merge` before any model
    # loads); None: `merge` decides on the built model.
    merge_blocker: ClassVar[str | None] = None

    @classmethod
    def check(cls, recipe: Recipe, cuda: bool | None = None) -> list[str]:
        """Problems with this method in this recipe, found before any model loads (`cuda`: None = this machine)."""
        problems = []
        family = recipe.backbone.family
        if family != "auto" and family not in cls.families:
            problems.append(f"method.name: {cls.name!r} does not apply to backbone family {family!r}; "
                            f"it supports {', '.join(cls.families)}{cls.family_note}")
        quant = recipe.backbone.quantization
        if quant is not None:
            if quant.bits not in cls.quantized_bits:
                others = [m for m in METHODS.names() if quant.bits in METHODS.get(m).quantized_bits
                          and METHODS.get(m).trains and (family == "auto" or family in METHODS.get(m).families)]
                problems.append(f"method.name: {cls.name!r} cannot run on a {quant.bits}-bit backbone "
                                f"(backbone.quantization.bits: {quant.bits}): {cls.quantized_note}; methods that "
                                f"can: {', '.join(others)}; or remove backbone.quantization")
            problems += quantization.problems(quant)
        return problems

    def apply(self, backbone: Backbone, config: MethodConfig, labels: LabelSet | None = None) -> None:
        """Wrap `backbone` in place. `labels` is the task's label set, for methods whose shape depends on it."""
        raise NotImplementedError

    def image_tower_frozen(self, backbone: Backbone, config: MethodConfig) -> bool:
        """After `apply`: are image features exactly the untouched backbone's? If so they may be cached once.

        The default reads the applied model instead of trusting a declaration: no trainable parameter and no forward
        hook under the image tower. A method that changes image-path weights at apply time without training them
        must override this (the feature cache's spot check catches it too, at the cost of a warning).
        """
        return image_path_untouched(backbone)

    def save(self, backbone: Backbone, config: MethodConfig, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in trainable_state(backbone).items()}
        with atomic_path(directory / STATE_FILE) as tmp:
            save_file(state, str(tmp))
        write_json(directory / CONFIG_FILE, {"method": to_plain(config), "base": backbone.name_or_path})

    def load(self, backbone: Backbone, config: MethodConfig, directory: Path) -> None:
        """Restore trained state onto a backbone that `apply` has already wrapped."""
        state = load_file(str(directory / STATE_FILE))
        load_trainable_state(backbone, state)

    def merge(self, backbone: Backbone, config: MethodConfig) -> None:
        """Fold the trained state into the base weights in place, so `backbone.model` becomes a plain transformers
        model that computes what the trained backbone computes (for `mmpeft export --merge`); raise CannotMerge
        saying why when it cannot. The default covers peft adapters (merge_and_unload) and methods whose trained
        tensors already are base weights (BitFit, full fine-tuning); it refuses heads, prompt vectors and added
        modules. A method with another way to fold overrides this."""
        if self.merge_blocker:
            raise CannotMerge(self.merge_blocker)
        fold_into_base(backbone)


class CannotMerge(ValueError):
    """A method's trained state cannot be folded into the base model's own weights; the message says why."""


def fold_into_base(backbone: Backbone) -> None:
    """The default `Method.merge`: unwrap a peft model with its own merge; refuse anything the base cannot hold."""
    if backbone.head is not None:
        raise CannotMerge("trains a classification head on the image features, which replaces label-text scoring; "
                          "the base model has no place for it")
    if backbone.text_prompts is not None:
        raise CannotMerge("learns text prompt vectors, which are inputs to the text tower, not weights")
    model = backbone.model
    if hasattr(model, "peft_config"):
        if any(getattr(c, "is_prompt_learning", False) for c in model.peft_config.values()):
            raise CannotMerge("is peft prompt learning: its virtual tokens are inputs, not weights")
        model = model.merge_and_unload()
    added = added_tensors(model)
    if added:
        raise CannotMerge(f"adds {len(added)} tensor{'s' if len(added) > 1 else ''} the base architecture does not "
                          f"have (for example {added[0]!r}): no base weight can absorb them")
    backbone.model = model


def added_tensors(model: nn.Module) -> list[str]:
    """State-dict keys of `model` that a fresh instance of its architecture lacks (built on the meta device)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        fresh = type(model)._from_config(model.config)
    return sorted(set(model.state_dict()) - set(fresh.state_dict()))


METHODS: Registry[type[Method]] = Registry("method")


def register(cls: type[Method]) -> type[Method]:
    return METHODS.register(cls.name)(cls)


def freeze(backbone: Backbone) -> None:
    """Freeze every weight before a method unfreezes or adds its own; a k-bit base also gets peft's preparation."""
    backbone.requires_grad_(False)
    quantization.prepare_for_training(backbone.model)


def require_labels(method: str, labels: LabelSet | None, why: str) -> LabelSet:
    if labels is None:
        raise ValueError(f"method {method!r} needs the task's label set ({why}): call apply(backbone, config, labels)")
    return labels


def trainable_state(module: nn.Module) -> dict:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def image_path_untouched(backbone: Backbone) -> bool:
    """No trainable parameter and no forward hook under the image tower (and `encode_images` not replaced)."""
    if "encode_images" in vars(backbone):
        return False
    vision = re.compile(backbone.tower_pattern("vision"))
    if any(p.requires_grad for name, p in backbone.named_parameters() if vision.search(name)):
        return False
    return not any(module._forward_hooks or module._forward_pre_hooks
                   for name, module in backbone.named_modules() if vision.search(name))


def load_trainable_state(module: nn.Module, state: dict) -> None:
    params = dict(module.named_parameters())
    missing = [name for name in trainable_state(module) if name not in state]
    unknown = [name for name in state if name not in params]
    if missing or unknown:
        raise ValueError(f"saved state does not match the model: missing {missing[:3]}, unexpected {unknown[:3]}")
    for name, value in state.items():
        params[name].data.copy_(value.to(params[name].device, params[name].dtype))


def count_parameters(module: nn.Module) -> dict[str, float]:
    total = trainable = 0
    for p in module.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)  # packed 4-bit holds 2 values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def read_method_config(directory: Path) -> dict:
    return json.loads((directory / CONFIG_FILE).read_text())
