"""(model, processor) through transformers' Auto classes: dtype, revision, 4/8-bit, or fresh random weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmpeft.backbones.base import BackboneError
from mmpeft.backbones.image_only import image_only_processor
from mmpeft.backbones.quantization import bnb_config, prepare_loaded
from mmpeft.core.dtypes import DTYPES

if TYPE_CHECKING:
    from mmpeft.specs import BackboneSpec


def load_pretrained(model_class, spec: BackboneSpec, path: str):
    """(model, processor) through the Auto classes, with dtype, revision and optional quantization.

    `backbone.init: scratch` builds the architecture from the folder's config with fresh random weights (drawn
    from torch's global generator, which the pipeline seeds) and keeps its processor: pre-training from zero.
    """
    from transformers import AutoConfig, AutoProcessor

    kwargs = {"dtype": DTYPES[spec.dtype]}
    if spec.quantization is not None:
        kwargs["quantization_config"] = bnb_config(spec.quantization)
    if spec.init == "scratch":
        config = from_pretrained(AutoConfig, path, spec)
        model = model_class.from_config(config, dtype=kwargs["dtype"], trust_remote_code=spec.trust_remote_code)
    else:
        model = from_pretrained(model_class, path, spec, **kwargs)
    if spec.quantization is not None:
        prepare_loaded(model)
    # Qwen2-VL-style folders name a stock processor that cannot load without torchvision: use its image-only variant.
    processor_class = image_only_processor(getattr(model.config, "model_type", "")) or AutoProcessor
    processor = from_pretrained(processor_class, path, spec)
    return model, processor


def from_pretrained(cls, path: str, spec: BackboneSpec, **kwargs):
    try:
        return cls.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **kwargs)
    except OSError as error:
        where = "local directory" if Path(path).is_dir() else "hub id (offline here? set HF_HUB_OFFLINE=0 online)"
        raise BackboneError(f"backbone.id {spec.id!r}: could not load {cls.__name__} from {where}: "
                            f"{str(error).splitlines()[0]}") from None
