"""The Backbone interface every family implements, and the registries that list families and demo names.

Why an abstract base: training, evaluation, methods and exports are written once against this interface, so
they never ask a backbone what it is. A capability only one family has is a method here that raises a clear
"not supported for family X" error, or a declared class flag (`caches_image_features`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from mmpeft.core.registry import Registry

if TYPE_CHECKING:
    from PIL import Image

    from mmpeft.data import LabelSet
    from mmpeft.specs import BackboneSpec, Recipe


class BackboneError(ValueError):
    """A backbone that cannot be found or used, with what would work instead."""


class Backbone(torch.nn.Module, ABC):
    """What every family wraps: the transformers model (methods may replace it with a peft wrapper), its processor,
    and the hooks methods may set (`head`: logits from image features; `text_prompts`: learned class prompts).

    A family sets `family`, `TOWER_PATTERNS` (tower -> module-name regex that methods target) and `DEFAULT_TOWERS`,
    and implements the abstract methods; `load` is its entry in the BACKBONES registry.
    """

    family: ClassVar[str]
    TOWER_PATTERNS: ClassVar[dict[str, str]]
    DEFAULT_TOWERS: ClassVar[tuple[str, ...]]
    caches_image_features: ClassVar[bool] = False  # images are scored through image-only features (cacheable)
    # some steps leave trainable parameters without a gradient (a batch of text-only rows skips the image tower and
    # projector; LLaVA reads the vision tower's second-to-last layer): DDP must look for unused parameters
    leaves_parameters_unused: ClassVar[bool] = False

    def __init__(self, model: torch.nn.Module, processor, name_or_path: str):
        super().__init__()
        self.model = model
        self.processor = processor
        self.name_or_path = name_or_path
        self.model_type = getattr(model.config, "model_type", "unknown")
        self.head: torch.nn.Module | None = None
        self.text_prompts: torch.nn.Module | None = None

    # --- loading and settings ---------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, spec: BackboneSpec, path: str) -> Backbone:
        """Load the model and processor at `path` (a local folder or hub id) as the spec says."""

    def configure(self, recipe: Recipe) -> None:
        """Take family-specific settings from the recipe; families without any keep this no-op."""

    def task_settings(self) -> dict[str, Any] | None:
        """Settings that `configure` took and an export must carry to score the same way; None when there are none."""
        return None

    def apply_task_settings(self, settings: dict[str, Any]) -> None:
        """Restore what `task_settings` returned (an export reloaded without its recipe)."""

    # --- parts --------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def base_model(self) -> torch.nn.Module:
        """The transformers model under any peft wrapper."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- what every family does -----------------------------------------------------------------------------------
    @abstractmethod
    def preprocess(self, images: list[Image.Image]) -> Any:
        """A batch of PIL images -> what `logits` reads as `pixel_values`."""

    @abstractmethod
    def class_text_features(self, labels: LabelSet) -> Any:
        """The class targets images are scored against (text embeddings, or answer token ids)."""

    @abstractmethod
    def logits(self, batch: dict, class_targets: Any) -> torch.Tensor:
        """[batch, classes] scores of a collated batch against `class_text_features` (None with a linear head)."""

    # --- the decoded-image cache (mmpeft.data.image_cache): decode and fit once, finish per batch ----------------
    def image_fit_key(self, room: bool) -> str:
        """What fixes `fit_image`'s output besides the image (part of every cache key)."""
        return "decoded-rgb-v1"

    def fit_image(self, image: Image.Image, room: bool) -> np.ndarray:
        """The uint8 height x width x 3 array the cache keeps for an image; `room`: augmentation will crop it.

        By default only decoded; a family whose processor allows it also resizes here, once per image.
        """
        return np.asarray(image.convert("RGB"))

    def preprocess_fitted(self, arrays: list[np.ndarray]) -> Any:
        """What `preprocess` gives for the images that `fit_image` returned these arrays for."""
        from PIL import Image

        return self.preprocess([Image.fromarray(np.asarray(array)) for array in arrays])

    def classify(self, pixel_values: Any, class_targets: Any) -> torch.Tensor:
        """Scores of preprocessed images alone (each asked the recipe's question, for generative backbones)."""
        return self.logits({"pixel_values": pixel_values}, class_targets)

    # --- for methods ----------------------------------------------------------------------------------------------
    @abstractmethod
    def tower_pattern(self, tower: str) -> str:
        """A regex that finds one tower's parameters by name."""

    @abstractmethod
    def default_lora_targets(self, towers: tuple[str, ...]) -> str:
        """A peft `target_modules` regex over the chosen towers."""

    # --- capabilities of one family: a clear error elsewhere --------------------------------------------------------
    def unsupported(self, what: str) -> BackboneError:
        return BackboneError(f"{what} is not supported for family {self.family!r} (backbone {self.name_or_path!r})")

    def default_ia3_targets(self, towers: tuple[str, ...]) -> tuple[str, str]:
        raise self.unsupported("IA3's default targets")

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise self.unsupported("image-only features")

    def score(self, image_features: torch.Tensor, class_targets: Any) -> torch.Tensor:
        raise self.unsupported("scoring cached image features")

    def logit_scale(self) -> torch.Tensor:
        raise self.unsupported("an image-text logit scale")

    def temperature(self) -> torch.nn.Parameter | None:
        """The model's learnable log temperature (CLIP's `logit_scale`), which contrastive training clamps."""
        raise self.unsupported("contrastive image-text training")

    def overlong_texts(self, texts: list[str]) -> tuple[int | None, list[tuple[str, int]]]:
        """(the text tower's token limit, the texts longer than it with their lengths): what `tokenize` would cut.
        None and [] where nothing is cut (generative backbones score whole answers)."""
        return None, []

    def references(self, batch: dict, labels: LabelSet) -> list[str]:
        raise self.unsupported("free-form answers")

    def image_embeddings(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        raise self.unsupported("image embeddings for nearest-neighbour demonstrations")

    def require(self, family: str, what: str) -> None:
        """Refuse, naming both families, what only `family` backbones can do."""
        if self.family != family:
            raise BackboneError(f"{what} needs a {family} backbone; backbone {self.name_or_path!r} is {self.family!r}")


BACKBONES: Registry[type[Backbone]] = Registry("backbone family")
DEMO_BACKBONES: Registry[Callable[[], Path]] = Registry("demo backbone")  # name -> builder returning a local dir
