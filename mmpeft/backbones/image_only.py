"""Image-only variants of processors whose stock class insists on a video processor (Qwen2-VL, Qwen2.5-VL).

Why: `Qwen2VLProcessor` and `Qwen2_5_VLProcessor` need a video processor, and every video processor in
transformers 5 needs torchvision, which is not installable everywhere (it is not here): the stock classes fail with
"Can't load video processor". The variants below drop the video processor. They load folders that name the stock
class (as real checkpoints do) or none, and they save the *stock* class name, so an export made here loads with
plain transformers (which adds its video processor where torchvision is installed).

The trap they avoid: a processor class `AutoProcessor` cannot build makes it fall back silently to a bare tokenizer.
`processor_for` picks the class by the model's type instead of trusting `AutoProcessor`.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLProcessor

__all__ = ["Qwen2VLImageOnlyProcessor", "Qwen2_5_VLImageOnlyProcessor", "image_only_processor", "register"]


class _ImageOnly:
    """Mixin: no video processor; the stock class name in processor_config.json and tokenizer_config.json."""

    stock_name: str

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The attributes transformers saves and reloads come from this signature: image processor and tokenizer.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "processor_class": self.stock_name}

    def save_pretrained(self, save_directory, *args, **kwargs):
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        tokenizer_config = Path(save_directory) / "tokenizer_config.json"
        if tokenizer_config.is_file():  # the tokenizer records the class that saved it; record the stock one
            settings = json.loads(tokenizer_config.read_text())
            if "processor_class" in settings:
                settings["processor_class"] = self.stock_name
                tokenizer_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
        return saved


class Qwen2VLImageOnlyProcessor(_ImageOnly, Qwen2VLProcessor):
    """Qwen2-VL's processor for images and text only (no video processor, so no torchvision needed)."""

    stock_name = "Qwen2VLProcessor"


class Qwen2_5_VLImageOnlyProcessor(_ImageOnly, Qwen2_5_VLProcessor):  # noqa: N801  (transformers' spelling)
    """Qwen2.5-VL's processor for images and text only."""

    stock_name = "Qwen2_5_VLProcessor"


IMAGE_ONLY = {"qwen2_vl": Qwen2VLImageOnlyProcessor, "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor}


def image_only_processor(model_type: str):
    """The image-only processor class for a model type whose stock processor needs torchvision here, else None."""
    from transformers.utils import is_torchvision_available

    return None if is_torchvision_available() else IMAGE_ONLY.get(model_type)


_registered = False


def register() -> None:
    """Map the configs to the image-only classes, so `AutoProcessor` on a folder without `processor_class` (or
    named by the variant, as folders saved by older mmpeft versions are) finds them."""
    from transformers.utils import is_torchvision_available

    global _registered
    if not _registered and not is_torchvision_available():
        AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageOnlyProcessor, exist_ok=True)
        AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor, exist_ok=True)
        _registered = True
