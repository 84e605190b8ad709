"""Dual encoders (CLIP, SigLIP, any model with get_image_features/get_text_features): images scored against labels."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.backbones.base import BACKBONES, Backbone, BackboneError
from mmpeft.backbones.loading import load_pretrained
from mmpeft.data.images import to_rgb
from mmpeft.specs import GENERATIVE_DATA_KEYS

if TYPE_CHECKING:
    from PIL import Image

    from mmpeft.data import LabelSet
    from mmpeft.specs import BackboneSpec, Recipe

# Module-name patterns per tower; they match with or without a peft wrapper in front.
TOWER_PATTERNS = {
    "vision": r"(vision_model|vision_tower|visual)",
    "text": r"(text_model|text_tower|textual)",
}
ATTENTION_PROJECTIONS = r"(q_proj|k_proj|v_proj|out_proj)"
ROOM = 8 / 7  # an augmented image's cached base is this much larger than the processor's input (256 px for 224)
logger = logging.getLogger("mmpeft")
TOWER_ATTRIBUTES = {"vision": "vision_model", "text": "text_model"}  # the towers of CLIP-style models


@BACKBONES.register("dual_encoder")
class DualEncoder(Backbone):
    """Wraps a transformers dual encoder; methods may replace `.model` (peft) or set `head`/`text_prompts`."""

    family = "dual_encoder"
    TOWER_PATTERNS = TOWER_PATTERNS
    DEFAULT_TOWERS = tuple(TOWER_PATTERNS)
    caches_image_features = True
    _finish_table: torch.Tensor | bool | None = None  # preprocess_fitted's lookup table (False: use the processor)
    _finish_checked = False

    @classmethod
    def load(cls, spec: BackboneSpec, path: str) -> DualEncoder:
        from transformers import AutoModel

        model, processor = load_pretrained(AutoModel, spec, path)
        if not is_dual_encoder(model):
            raise BackboneError(f"backbone.id {spec.id!r}: {type(model).__name__} has no get_image_features/"
                                "get_text_features, so it is not a dual encoder; try backbone.family: generative")
        return cls(model, processor, path)

    # --- inputs -------------------------------------------------------------------------------------------------
    @property
    def image_processor(self):
        return getattr(self.processor, "image_processor", self.processor)

    def configure(self, recipe: Recipe) -> None:
        """Refuse the generative-only data keys rather than ignore them (backbone.family: auto finds out here)."""
        given = [f"data.{key}" for key in GENERATIVE_DATA_KEYS if getattr(recipe.data, key) is not None]
        if given:
            raise BackboneError(f"{', '.join(given)}: the image budget and max_length apply to generative backbones; "
                                f"{self.name_or_path!r} is a dual encoder (it resizes every image to its input size)")

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Any PIL mode (`data.images.to_rgb`: 16-bit and float scaled, transparency on white), then the processor,
        whose own RGB conversion would clip a 16-bit image to white and a float one to black."""
        return self.image_processor(images=[to_rgb(image) for image in images], return_tensors="pt")["pixel_values"]

    # --- the decoded-image cache: the processor's resize and crop once per image, rescale/normalise per batch -----
    @property
    def exact_fit(self) -> bool:
        """A PIL processor with the standard steps (resize, crop, rescale, normalise, no padding): its resize and
        crop give uint8 pixels, so they can run once and the rest per batch, with results identical to `preprocess`."""
        from transformers.image_processing_backends import PilBackend

        processor = self.image_processor
        return (isinstance(processor, PilBackend) and type(processor)._preprocess is PilBackend._preprocess
                and not getattr(processor, "do_pad", False))

    def image_fit_key(self, room: bool) -> str:
        if not self.exact_fit:
            return super().image_fit_key(room)
        settings = json.dumps(self.image_processor.to_dict(), sort_keys=True, default=str)
        return f"clip-fit-v1:{'base' if room else 'input'}:{hashlib.sha1(settings.encode()).hexdigest()[:16]}"

    def fit_image(self, image: Image.Image, room: bool) -> np.ndarray:
        """The processor's resize and crop (uint8 HxWx3); with `room`, an aspect-kept base ROOM times larger."""
        if not self.exact_fit:
            return super().fit_image(image, room)
        if room:
            return _base_image(image.convert("RGB"), round(self._input_side() * ROOM), self.image_processor.resample)
        fitted = self.image_processor(images=[image], do_rescale=False, do_normalize=False)["pixel_values"][0]
        if fitted.dtype != np.uint8:
            raise BackboneError(f"{type(self.image_processor).__name__} resized to {fitted.dtype}, not uint8: "
                                "set data.image_cache: off for this backbone")
        return np.ascontiguousarray(np.moveaxis(fitted, 0, -1))

    def preprocess_fitted(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Rescale and normalise as a per-channel lookup table of the processor's own outputs for 0..255; the first
        batch is checked against the processor itself (any difference: the processor from then on)."""
        if not self.exact_fit:
            return super().preprocess_fitted(arrays)
        if self._finish_table is None:
            self._finish_table = _finish_table(self.image_processor)
        if self._finish_table is False:
            return self._processor_finish(arrays)
        table = self._finish_table.numpy()
        height, width, channels = arrays[0].shape
        out = np.empty((len(arrays), channels, height, width), dtype=table.dtype)
        for i, array in enumerate(arrays):  # numpy's take on uint8 indices, per plane: ~4x torch's indexing on CPU
            for channel in range(channels):
                np.take(table[channel], array[:, :, channel], out=out[i, channel])
        out = torch.from_numpy(out)
        if not self._finish_checked:
            self._finish_checked = True
            if not torch.equal(out, self._processor_finish(arrays)):
                logger.warning("image cache: the lookup table differs from %s; using the processor for each batch",
                               type(self.image_processor).__name__)
                self._finish_table = False
                return self._processor_finish(arrays)
        return out

    def _processor_finish(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return self.image_processor(images=[np.asarray(a) for a in arrays], do_resize=False, do_center_crop=False,
                                    input_data_format="channels_last", return_tensors="pt")["pixel_values"]

    def _input_side(self) -> int:
        processor = self.image_processor
        size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
        return max(int(value) for value in dict(size).values() if value)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        padding = "max_length" if self.model_type.startswith("siglip") else True
        max_length = getattr(self.base_model.config.text_config, "max_position_embeddings", None)
        tokens = self.tokenizer(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

    def overlong_texts(self, texts: list[str]) -> tuple[int | None, list[tuple[str, int]]]:
        limit = getattr(self.base_model.config.text_config, "max_position_embeddings", None)
        if limit is None or not texts:
            return limit, []
        lengths = [len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]]
        return limit, [(text, length) for text, length in zip(texts, lengths) if length > limit]

    # --- features -----------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = getattr(self.base_model, "dtype", pixel_values.dtype)
        output = self.model.get_image_features(pixel_values=pixel_values.to(self.device, dtype))
        return F.normalize(_pooled(output).float(), dim=-1)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None and not self.model_type.startswith("siglip"):
            kwargs["attention_mask"] = attention_mask
        return F.normalize(_pooled(self.model.get_text_features(**kwargs)).float(), dim=-1)

    def class_text_features(self, labels: LabelSet) -> torch.Tensor:
        """One normalised embedding per class: the mean over its prompt texts (a template ensemble)."""
        if self.text_prompts is not None:
            return self.text_prompts(self, labels)
        prompts = [labels.prompts(i) for i in range(len(labels))]
        flat = [text for group in prompts for text in group]
        features = self.encode_texts(**self.tokenize(flat))
        chunks = torch.split(features, [len(group) for group in prompts])
        return F.normalize(torch.stack([chunk.mean(0) for chunk in chunks]), dim=-1)

    def temperature(self) -> nn.Parameter | None:
        return getattr(self.base_model, "logit_scale", None)

    def logit_scale(self) -> torch.Tensor:
        scale = self.temperature()
        return scale.exp().float() if scale is not None else torch.tensor(100.0, device=self.device)

    def logit_bias(self) -> torch.Tensor | float:
        bias = getattr(self.base_model, "logit_bias", None)
        return bias.float() if bias is not None else 0.0

    def logits(self, batch: dict, text_features: torch.Tensor | None) -> torch.Tensor:
        """Logits [batch, classes]: scaled cosine similarity to each class text (or the linear head), from pixels or
        from cached image features (the batches of a FeatureDataset)."""
        if "image_features" in batch:
            return self.score(batch["image_features"], text_features)
        return self.score(self.encode_images(batch["pixel_values"]), text_features)

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        """Logits from image features already encoded (by `encode_images`, or cached for a frozen image tower)."""
        image_features = image_features.to(self.device)
        if self.head is not None:
            return self.head(image_features)
        return image_features @ text_features.t() * self.logit_scale() + self.logit_bias()

    # --- for methods --------------------------------------------------------------------------------------------
    def tower_pattern(self, tower: str) -> str:
        return TOWER_PATTERNS[tower]

    def default_lora_targets(self, towers: tuple[str, ...]) -> str:
        """A peft `target_modules` regex: attention projections of every encoder layer of the chosen towers."""
        tower = "|".join(TOWER_PATTERNS[t] for t in towers)
        return rf".*({tower})\.encoder\.layers\.\d+\.self_attn\.{ATTENTION_PROJECTIONS}"

    def default_ia3_targets(self, towers: tuple[str, ...]) -> tuple[str, str]:
        """peft IA3 (target_modules, feedforward_modules) regexes: key/value projections and the MLP's fc2."""
        tower = "|".join(TOWER_PATTERNS[t] for t in towers)
        layers = rf".*({tower})\.encoder\.layers\.\d+"
        return rf"{layers}\.(self_attn\.(k_proj|v_proj)|mlp\.fc2)", rf"{layers}\.mlp\.fc2"

    def tower_model(self, tower: str) -> nn.Module:
        """The transformer of one tower (with `.embeddings` and `.encoder.layers`), under any peft wrapper."""
        model = getattr(self.base_model, TOWER_ATTRIBUTES[tower], None)
        if model is None:
            raise BackboneError(f"{type(self.base_model).__name__} has no {TOWER_ATTRIBUTES[tower]}: "
                                f"methods that edit the {tower} tower's layers do not support it yet")
        return model

    def encoder_layers(self, tower: str) -> list[nn.Module]:
        """Encoder layers of a tower; each has `.self_attn` and `.mlp` (CLIP and SigLIP alike)."""
        return list(self.tower_model(tower).encoder.layers)


def _base_image(image: Image.Image, side: int, resample) -> np.ndarray:
    """Shrink (never enlarge) so the shorter side is `side`, keeping the aspect ratio."""
    width, height = image.size
    if min(width, height) > side:
        scale = side / min(width, height)
        image = image.resize((max(side, round(width * scale)), max(side, round(height * scale))), resample)
    return np.asarray(image)


def _finish_table(processor) -> torch.Tensor:
    """[3, 256]: the processor's rescale + normalise of every uint8 value of each channel (a 1 x 256 ramp image)."""
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    out = processor(images=[ramp], do_resize=False, do_center_crop=False, input_data_format="channels_last",
                    return_tensors="pt")["pixel_values"][0]
    return out[:, 0, :].contiguous()


def _pooled(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def is_dual_encoder(model: nn.Module) -> bool:
    return hasattr(model, "get_image_features") and hasattr(model, "get_text_features")
