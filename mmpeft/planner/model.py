"""The memory planner's model: the recipe's backbone built from its config on the meta device, the method applied.

Why the meta device: shapes, dtypes and which parameters train are all a memory plan needs, and meta tensors carry
them without holding memory or reading weights, so a billion-parameter backbone builds in seconds on a laptop and
the counts come from the very code a run uses (`Method.apply`), not from a second description of each method.
A method that cannot run on meta tensors (one that computes with weights while applying, e.g. a linear probe
initialised from text features) is counted by its own formula instead, and the plan says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmpeft.backbones import BackboneError, resolve_path
from mmpeft.core.dtypes import DTYPES

if TYPE_CHECKING:
    from mmpeft.data import LabelSet
    from mmpeft.specs import BackboneSpec, QuantizationSpec, Recipe


# bitsandbytes layouts: 4-bit packs two values per byte with one absmax per 64 values (fp32, or 8-bit codes with one
# fp32 absmax per 256 of them under double quantization); 8-bit keeps int8 values and one fp32 scale per output row.
BLOCK_4BIT = 64
BLOCK_NESTED = 256
CODE_4BIT = 16 * 4  # per 4-bit layer: its nf4/fp4 code book
CODE_NESTED = 256 * 4 + 4  # per double-quantized layer: the absmax code book and offset


class PlanError(BackboneError):
    """The planner cannot build or count this recipe; the message says what would work."""


@dataclass
class MetaBackbone:
    """A backbone on the meta device after the recipe's method was applied, with what the plan needs beside it."""

    backbone: nn.Module
    labels: LabelSet
    quantizable: set[int]  # ids of the linear weights bitsandbytes would quantize (before the method wrapped them)
    counted_by: str = "meta"  # "meta", or the formula used when the method could not be applied on meta tensors
    notes: list[str] = field(default_factory=list)

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer


def build_meta_backbone(recipe: Recipe, labels: LabelSet) -> MetaBackbone:
    """Config -> meta model -> DualEncoder -> method applied (or counted by formula). No weights are read.
    (Generative VLMs: `mmpeft.planner.generative.build_generative_meta`.)"""
    from mmpeft.backbones import config_family
    from mmpeft.backbones.dual_encoder import DualEncoder, is_dual_encoder
    from mmpeft.methods import METHODS

    spec = recipe.backbone
    path, config = load_config(spec)
    if spec.family == "generative" or config_family(config) == "generative":
        architectures = " ".join(getattr(config, "architectures", None) or [])
        raise PlanError(f"backbone.id {spec.id!r} is a generative VLM ({architectures or config.model_type}), not "
                        f"a dual encoder (backbone.family: {spec.family}); set backbone.family: generative or auto")
    model = _meta_model(config, spec)
    if not is_dual_encoder(model):
        raise PlanError(f"backbone.id {spec.id!r}: {type(model).__name__} is not a dual encoder or a generative "
                        "VLM; the planner covers dual encoders (CLIP, SigLIP, ...) and image-text-to-text models")
    quantizable = quantizable_weights(model)
    backbone = DualEncoder(model, _processor(path, spec), path)
    method = METHODS.get(recipe.method.name)()
    try:
        method.apply(backbone, recipe.method, labels)
        meta = MetaBackbone(backbone, labels, quantizable)
    except Exception as error:  # noqa: BLE001 - any failure on meta tensors falls back to the method's formula
        formula = FORMULAS.get(recipe.method.name)
        if formula is None:
            raise PlanError(f"method {recipe.method.name!r} could not be applied on the meta device "
                            f"({first_line(error)}) and the planner has no formula for it") from error
        backbone = DualEncoder(_meta_model(config, spec), backbone.processor, path)
        meta = MetaBackbone(backbone, labels, quantizable_weights(backbone.model))
        meta.counted_by = formula(backbone, recipe.method, labels)
        meta.notes.append(f"{recipe.method.name} cannot be applied on meta tensors ({first_line(error)}); "
                          f"counted by formula: {meta.counted_by}")
    backbone.train()
    return meta


def load_config(spec: BackboneSpec) -> tuple[str, Any]:
    """(path, config) from a demo name, a local folder, or a hub id whose config is in the local HF cache."""
    from transformers import AutoConfig

    path = resolve_path(_config_twin(spec))
    kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    try:
        return path, AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
    except OSError as error:
        local_error = error
    except ValueError as error:  # an unrecognised model_type
        raise PlanError(f"backbone.id {spec.id!r}: {first_line(error)}") from None
    if not os.path.isdir(path) and not _hub_offline():
        try:
            return path, AutoConfig.from_pretrained(path, **kwargs)
        except OSError as error:
            local_error = error
    raise PlanError(unknown_backbone_message(spec.id, local_error)) from None


def _config_twin(spec: BackboneSpec) -> BackboneSpec:
    """A demo backbone built by pre-training (digits-clip) has a `<name>-config` twin with the same architecture,
    tokenizer and processor and random weights: planning reads that, so it never triggers the pre-training."""
    import dataclasses

    import mmpeft.runs.demo  # noqa: F401  (registers the demo names)
    from mmpeft.backbones import DEMO_BACKBONES

    twin = f"{spec.id}-config"
    return dataclasses.replace(spec, id=twin) if spec.id.startswith("mmpeft-demo/") and twin in DEMO_BACKBONES \
        else spec


def unknown_backbone_message(backbone_id: str, error: Exception | None = None) -> str:
    """One line: what was asked, why it failed, and every kind of id that would work here."""
    from mmpeft.backbones import DEMO_BACKBONES

    cached = cached_hub_models()
    where = "a local folder" if os.path.isdir(backbone_id) else "the local Hugging Face cache"
    offline = " and the Hub is offline (HF_HUB_OFFLINE=1)" if _hub_offline() else ""
    reason = f" ({first_line(error)})" if error is not None and os.path.isdir(backbone_id) else ""
    return (f"backbone.id {backbone_id!r}: no model config in {where}{offline}{reason}; valid: a local model folder "
            f"with config.json, a hub id whose config is cached (cached: {', '.join(cached[:8]) or 'none'}), or a "
            f"demo backbone ({', '.join(DEMO_BACKBONES.names())})")


def cached_hub_models() -> list[str]:
    """Model repo ids in the local Hugging Face hub cache that hold a config.json."""
    try:
        from huggingface_hub import constants, scan_cache_dir

        repos = scan_cache_dir(constants.HF_HUB_CACHE).repos
    except Exception:  # noqa: BLE001 - no cache folder, or an unreadable one: nothing cached
        return []
    return sorted(r.repo_id for r in repos if r.repo_type == "model"
                  and any(f.file_name == "config.json" for rev in r.revisions for f in rev.files))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _meta_model(config: Any, spec: BackboneSpec) -> nn.Module:
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(config, dtype=DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code)


def _processor(path: str, spec: BackboneSpec) -> Any:
    """The tokenizer and image processor hold no weights; a hub id with only its config cached plans without them."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True, revision=spec.revision,
                                             trust_remote_code=spec.trust_remote_code)
    except Exception:  # noqa: BLE001 - no processor files: text lengths then come from the config
        return None


def quantizable_weights(model: nn.Module) -> set[int]:
    """Ids of the nn.Linear weights transformers would hand to bitsandbytes (its own skip rules where available)."""
    skip: list[str] = []
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    except (ImportError, AttributeError, IndexError):
        def should_convert_module(name: str, patterns: list[str] | None = None) -> bool:
            return True
    return {id(module.weight) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and should_convert_module(name, skip or None)}


# --- counts and bytes -------------------------------------------------------------------------------------------

def weight_bytes(meta: MetaBackbone, quantization: QuantizationSpec | None, trains: bool) -> int:
    """Bytes of parameters and buffers as a run holds them: quantized linear weights at bitsandbytes' layout.

    With quantization, peft's k-bit preparation (which every training method's `freeze` runs) upcasts the other
    half-precision parameters to float32; the planner follows it.
    """
    total = 0
    for param in meta.backbone.parameters():
        if quantization is not None and id(param) in meta.quantizable:
            total += quantized_bytes(param.shape, quantization)
        elif quantization is not None and trains and param.dtype in (torch.float16, torch.bfloat16):
            total += param.numel() * 4
        else:
            total += param.numel() * param.element_size()
    return total + sum(b.numel() * b.element_size() for b in meta.backbone.buffers())


def quantized_bytes(shape: torch.Size, quantization: QuantizationSpec) -> int:
    """One linear weight [out, in] under bitsandbytes 4-bit (nf4/fp4, optional double quantization) or 8-bit."""
    numel = int(torch.Size(shape).numel())
    if quantization.bits == 8:
        return numel + shape[0] * 4  # int8 values + one fp32 scale per output row
    blocks = -(-numel // BLOCK_4BIT)
    if quantization.double_quant:
        return -(-numel // 2) + CODE_4BIT + blocks + 4 * -(-blocks // BLOCK_NESTED) + CODE_NESTED
    return -(-numel // 2) + CODE_4BIT + 4 * blocks


def trainable_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def trainable_sizes(module: nn.Module) -> list[tuple[int, int]]:
    """(numel, element size) of every trainable parameter: what gradients and optimizer states are made of."""
    return [(p.numel(), p.element_size()) for p in module.parameters() if p.requires_grad]


# --- formulas for methods that cannot be applied on meta tensors ---------------------------------------------------

def _linear_probe_formula(backbone: nn.Module, config: Any, labels: LabelSet) -> str:
    """A linear head on the image features: (feature size + 1) x classes, the backbone frozen."""
    backbone.requires_grad_(False)
    config = backbone.base_model.config
    dim = getattr(config, "projection_dim", None) or backbone.tower_model("vision").config.hidden_size
    backbone.head = nn.Linear(dim, len(labels), device="meta")
    return f"head ({dim} features + 1) x {len(labels)} classes"


def _coop_formula(backbone: nn.Module, config: Any, labels: LabelSet) -> str:
    """CoOp: n_ctx context vectors of the text width (per class when class_specific); the text tower backpropagates."""
    backbone.requires_grad_(False)
    embedding = backbone.tower_model("text").embeddings.token_embedding
    shape = (len(labels), config.n_ctx, embedding.embedding_dim) if config.class_specific \
        else (config.n_ctx, embedding.embedding_dim)
    context = nn.Parameter(torch.empty(shape, device="meta"))
    backbone.register_parameter("planned_context", context)
    embedding.register_forward_hook(lambda module, inputs, output: output + context.sum() * 0)
    per_class = f" x {len(labels)} classes" if config.class_specific else ""
    return f"context {config.n_ctx} x {embedding.embedding_dim}{per_class}"


FORMULAS: dict[str, Callable[[nn.Module, Any, Any], str]] = {
    "linear_probe": _linear_probe_formula,
    "coop": _coop_formula,
}


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
