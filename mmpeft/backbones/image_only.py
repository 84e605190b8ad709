"""Image-only variants of processors whose stock class insists on a video processor (the Qwen2-VL family).

Why: `Qwen2VLProcessor` needs a video processor, and every video processor in transformers 5 needs torchvision,
which is not installable everywhere (it is not here). The variant below drops the video processor and is registered
with `AutoProcessor`, so a folder saved with it (`processor_class: Qwen2VLImageOnlyProcessor`) reloads. The trap:
a process that has not run `register()` gets no error from `AutoProcessor.from_pretrained`, just a bare tokenizer;
`mmpeft.backbones.generative` registers on import and refuses a processor without an image processor.
"""

from __future__ import annotations

from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLProcessor

__all__ = ["Qwen2VLImageOnlyProcessor", "register"]


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for images and text only (no video processor, so no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The attributes transformers saves and reloads come from this signature: image processor and tokenizer.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


_registered = False


def register() -> None:
    """Make `AutoProcessor.from_pretrained` find the image-only class by the name saved in processor_config.json.

    A folder naming the stock `Qwen2VLProcessor` still resolves to it by name; only folders without a
    `processor_class` fall back to this mapping.
    """
    global _registered
    if not _registered:
        AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageOnlyProcessor, exist_ok=True)
        _registered = True
