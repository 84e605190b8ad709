"""4/8-bit loading (transformers' BitsAndBytesConfig) and k-bit training preparation (peft), plus honest footprints.

CUDA is the target. bitsandbytes also runs 4/8-bit on CPU here, slowly: good for checking a recipe, not for numbers,
so loading on CPU says so once. What the CPU backend cannot do is refused at recipe validation (`problems`).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from mmpeft.core.dtypes import DTYPES

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

    from mmpeft.specs import QuantizationSpec

logger = logging.getLogger("mmpeft")

CPU_WARNING = ("backbone.quantization: no CUDA device, so bitsandbytes runs {bits}-bit on the CPU: "
               "slow and for checking only; use a CUDA machine for real runs")
_warned_cpu = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def problems(spec: QuantizationSpec | None) -> list[str]:
    """What stops this quantization setting from loading here, found before any model loads."""
    if spec is None:
        return []
    if importlib.util.find_spec("bitsandbytes") is None:
        return [f"backbone.quantization.bits: {spec.bits}-bit loading needs bitsandbytes, which is not installed "
                "(pip install 'bitsandbytes>=0.45'), or remove backbone.quantization"]
    return []


def bnb_config(spec: QuantizationSpec) -> BitsAndBytesConfig:
    """The transformers config for `backbone.quantization`; the 4-bit fields only matter for bits: 4."""
    from transformers import BitsAndBytesConfig

    found = problems(spec)
    if found:
        raise ValueError(found[0])
    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=spec.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[spec.compute_dtype])


def quantized_bits(model: nn.Module) -> int | None:
    """4 or 8 when `model` (or the model under a peft wrapper) was loaded through bitsandbytes, else None."""
    if getattr(model, "is_loaded_in_4bit", False):
        return 4
    if getattr(model, "is_loaded_in_8bit", False):
        return 8
    return None


def prepare_loaded(model: nn.Module) -> None:
    """Right after a quantized load: warn once on CPU, and keep CPU 4-bit layers trainable after an eval pass.

    bitsandbytes 0.50 repacks a Linear4bit for a faster CPU kernel the first time it runs in eval mode without
    gradients (the zero-shot evaluation before training does exactly that). A repacked layer then runs without
    autograd, so training after it is wrong, and layers narrower than the quantization block (tiny test models)
    fail to repack at all. Turning the repacking off costs CPU inference speed only; CUDA is untouched.
    """
    global _warned_cpu
    bits = quantized_bits(model)
    if bits is None or cuda_available():
        return
    if not _warned_cpu:
        logger.warning(CPU_WARNING.format(bits=bits))
        _warned_cpu = True
    # A per-call note from bitsandbytes' CPU int8 path that says nothing the warning above does not.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast from")
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_for_training(model: nn.Module) -> None:
    """peft's k-bit preparation on a quantized model; a no-op otherwise.

    Arguments chosen deliberately: `use_gradient_checkpointing=False`. Checkpointing trades step time for
    activation memory, which is the recipe's choice (`train.gradient_checkpointing`, non-reentrant), not a side
    effect of quantizing; peft's default would also switch on the reentrant variant and its input-grad hook on the
    embeddings, where the prompt methods hook in. The fp32 cast of non-quantized parameters (norms, embeddings) is
    kept: it is what keeps QLoRA stable in half precision, and a no-op for an fp32 model.
    """
    if quantized_bits(model) is None:
        return
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def weight_bytes(module: nn.Module, linear_only: bool = False) -> int:
    """Bytes held by weights: parameters and buffers plus the quantization state bitsandbytes keeps beside them.

    A packed 4-bit parameter stores 2 values per byte, so `numel * element_size` is already its true size; its
    absmax / code tensors (and the scales of an 8-bit weight) live outside `parameters()` and are added here.
    `linear_only` counts only linear layers (quantized or not), the part quantization shrinks.
    """
    seen: set[int] = set()
    total = 0

    def add(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.numel() and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()

    modules = [m for m in module.modules() if _is_linear(m)] if linear_only else [module]
    for owner in modules:
        for tensor in (*owner.parameters(), *owner.buffers()):
            add(tensor)
            for extra in _quant_state_tensors(tensor):
                add(extra)
    return total


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt", "LinearFP4",
                                                                      "LinearNF4")


def _quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    state = getattr(param, "quant_state", None)
    found = [getattr(param, "SCB", None)]  # 8-bit: one fp32 scale per output row
    if state is not None:  # 4-bit: block absmax + code, and with double quant the absmax's own state
        found += [state.absmax, state.code, getattr(state, "offset", None)]
        nested = getattr(state, "state2", None)
        if nested is not None:
            found += [nested.absmax, nested.code]
    return [t for t in found if isinstance(t, torch.Tensor)]
