"""Tiny LLaVA: 32 px / patch 8 = 16 patches, the CLS token dropped by the "default" feature strategy, so the
processor writes 16 image tokens, as many as the projector makes."""

from __future__ import annotations

import os
from pathlib import Path

from mmpeft.tiny.generative.common import IMAGE_SIZE, INIT_STD, build_bpe_tokenizer, set_generation_ids
from mmpeft.tiny.save import save_folder, seeded_model

LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_llava(out_dir: str | os.PathLike[str], seed: int = 0, init_std: float = INIT_STD) -> Path:
    """LLaVA: a CLIP vision tower (32 px, patch 8), a 2-layer MLP projector and a tiny Llama (about 70k parameters)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
    )

    tokenizer = build_bpe_tokenizer(("<pad>", "<s>", "</s>", "<image>"), pad_token="<pad>", bos_token="<s>",
                                    eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<pad>", "<s>", "</s>", "<image>")}
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=init_std, pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"],
                       eos_token_id=ids["</s>"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    config.pad_token_id, config.eos_token_id = ids["<pad>"], ids["</s>"]
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    model = seeded_model(LlavaForConditionalGeneration, config, seed)
    set_generation_ids(model, ids["<pad>"], ids["</s>"], ids["<s>"])
    return save_folder(out_dir, model, processor)
