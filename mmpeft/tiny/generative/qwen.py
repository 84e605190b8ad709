"""Tiny Qwen2-VL and Qwen2.5-VL: patch 8 with a 2x2 merge, so a 32x32 image is 4 tokens and other sizes vary; the
processors are the image-only variants (no torchvision), saved under the stock class names; M-RoPE sections sum
to head_dim / 2."""

from __future__ import annotations

import os
from pathlib import Path

from mmpeft.tiny.generative.common import IMAGE_SIZE, INIT_STD, build_bpe_tokenizer, set_generation_ids
from mmpeft.tiny.save import save_folder, seeded_model

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")


def build_qwen2vl(out_dir: str | os.PathLike[str], seed: int = 0, init_std: float = INIT_STD) -> Path:
    """Qwen2-VL: a 2-block vision transformer (patch 8, 2x2 merge) and a tiny Qwen2 with M-RoPE (about 90k params)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from mmpeft.backbones.image_only import Qwen2VLImageOnlyProcessor

    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2}
    return _build(out_dir, seed, init_std, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageOnlyProcessor,
                  vision)


def build_qwen25vl(out_dir: str | os.PathLike[str], seed: int = 0, init_std: float = INIT_STD) -> Path:
    """Qwen2.5-VL: window attention in the vision blocks (block 1 full), a gated-MLP merger, the same tiny Qwen2."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from mmpeft.backbones.image_only import Qwen2_5_VLImageOnlyProcessor

    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 32,
              "window_size": 16, "fullatt_block_indexes": [1]}
    return _build(out_dir, seed, init_std, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                  Qwen2_5_VLImageOnlyProcessor, vision)


def _build(out_dir, seed: int, init_std: float, config_cls, model_cls, processor_cls, vision: dict) -> Path:
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = build_bpe_tokenizer(QWEN_SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    config = config_cls(
        vision_config={**vision, "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512, "initializer_range": init_std, "bos_token_id": None,
                     "pad_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     # head_dim 8: the temporal/height/width sections must sum to head_dim / 2
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    # min 32x32, max 64x64 pixels: images of other shapes become other token counts (4 to 16), as in real use
    image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                               min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=4 * IMAGE_SIZE ** 2,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHATML_TEMPLATE)
    model = seeded_model(model_cls, config, seed)
    set_generation_ids(model, ids["<|endoftext|>"], ids["<|im_end|>"], None)
    return save_folder(out_dir, model, processor)
