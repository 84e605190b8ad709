"""The task a generative backbone is put (question, answer template, scoring, generation) and its image budget: how
many pixels, and so how many image tokens, one image may become. Both travel with an export.

Why a budget: a dynamic-resolution processor (Qwen2-VL, Qwen2.5-VL) turns a 4000x3000 photo into thousands of
tokens, and Idefics3/SmolVLM's image splitting into a dozen crops; one such image can exhaust memory or the sequence
length.
`data.max_pixels` / `data.min_pixels` set the pixel range the dynamic processors resize into, exactly as they take
it (their `size` of shortest_edge/longest_edge pixels); `data.max_image_edge` caps every image's longest edge before
the processor, and the longest edge a splitting processor resizes to, for every other family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from mmpeft.backbones.base import BackboneError


@dataclass
class GenerativeTask:
    """How a classification or VQA task is put to the model; set from the recipe by `configure`."""

    question: str = "What is in the image?"
    answer_template: str = "{label}"
    length_normalize: bool = False
    max_new_tokens: int = 16
    max_pixels: int | None = None  # the image budget (ImageBudget) and a conversation's token limit
    min_pixels: int | None = None
    max_image_edge: int | None = None
    max_length: int | None = None

    @property
    def budget(self) -> ImageBudget:
        return ImageBudget(self.max_pixels, self.min_pixels, self.max_image_edge)


@dataclass(frozen=True)
class ImageBudget:
    max_pixels: int | None = None
    min_pixels: int | None = None
    max_edge: int | None = None

    @property
    def key(self) -> str:
        """Part of a cached encoding's key: the same image under another budget is another encoding."""
        return f"{self.max_pixels}:{self.min_pixels}:{self.max_edge}"

    def apply(self, image_processor: Any, backbone_id: str) -> None:
        """Set the budget on the processor, the way it takes it; refuse pixel bounds it has no use for."""
        size = getattr(image_processor, "size", None)
        if self.max_pixels is not None or self.min_pixels is not None:
            if not is_dynamic(image_processor):
                raise BackboneError(
                    f"data.max_pixels / data.min_pixels: {type(image_processor).__name__} of {backbone_id!r} resizes "
                    "to a fixed size, not into a pixel range (that is Qwen2-VL-style processors); cap large images "
                    "with data.max_image_edge instead")
            low = self.min_pixels if self.min_pixels is not None else size["shortest_edge"]
            high = self.max_pixels if self.max_pixels is not None else size["longest_edge"]
            if low > high:
                raise BackboneError(f"data.min_pixels ({low}) is larger than the maximum ({high} pixels, "
                                    f"{'data.max_pixels' if self.max_pixels is not None else 'the processor'}'s)")
            image_processor.size = _with(size, shortest_edge=low, longest_edge=high)
        if self.max_edge is not None and not is_dynamic(image_processor) and _splits(image_processor):
            crop = int(dict(image_processor.max_image_size)["longest_edge"])
            # whole crops only (the processor rounds a longest edge up to them), and never below one crop
            edge = max(crop, min(int(size["longest_edge"]), self.max_edge) // crop * crop)
            image_processor.size = _with(size, longest_edge=edge)

    def fit(self, image: Image.Image) -> Image.Image:
        """The image with its longest edge at most `max_edge` (aspect kept); the same image when it already is."""
        if self.max_edge is None or max(image.size) <= self.max_edge:
            return image
        scale = self.max_edge / max(image.size)
        width, height = (max(1, round(side * scale)) for side in image.size)
        return image.resize((width, height), Image.Resampling.BICUBIC)


def is_dynamic(image_processor: Any) -> bool:
    """A processor that resizes into a pixel range (Qwen2-VL's size: shortest_edge/longest_edge in pixels)."""
    return "max_pixels" in getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {})


def _splits(image_processor: Any) -> bool:
    """Idefics3/SmolVLM with image splitting: its size's longest_edge decides how many crops an image becomes."""
    size = dict(getattr(image_processor, "size", None) or {})
    return (bool(getattr(image_processor, "do_image_splitting", False)) and size.get("longest_edge") is not None
            and getattr(image_processor, "max_image_size", None) is not None)


def _with(size: Any, **changes: int) -> Any:
    """The processor's size (a dict or transformers' SizeDict) with `changes`, of the same type."""
    merged = {key: value for key, value in {**dict(size), **changes}.items() if value is not None}
    return type(size)(**merged)
