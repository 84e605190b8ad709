"""Tiny Idefics3 (the SmolVLM architecture), with and without image splitting.

A 32 px crop at patch 8 is 16 patches; the connector's pixel shuffle (scale factor 2) makes 4 image tokens, the
processor's `image_seq_len`. With splitting, an image is resized to at most 64 px on its longer side and cut into
32 px crops plus a global view, so a wide 100x30 image gets a different number of crops than a square one: what
batching must pad. The tokenizer carries the markers the processor writes (`<fake_token_around_image>`,
`<global-img>`, `<row_i_col_j>`). The text model sits under `model.text_model`, not `language_model`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmpeft.tiny.generative.common import IMAGE_SIZE, INIT_STD, build_bpe_tokenizer, set_generation_ids
from mmpeft.tiny.save import save_folder, seeded_model

__all__ = ["build_idefics3", "build_smolvlm"]

IDEFICS3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>{{ '\n' }}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
GRID = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
SPECIALS = ("<pad>", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
PATCH, SCALE_FACTOR = 8, 2


def build_idefics3(out_dir: str | os.PathLike[str], seed: int = 0, init_std: float = INIT_STD,
                   image_splitting: bool = False) -> Path:
    """Idefics3 without image splitting: every image one 32 px view, 4 image tokens."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer = build_bpe_tokenizer(SPECIALS + GRID, vocab_size=450, pad_token="<pad>", bos_token="<s>",
                                    eos_token="<end_of_utterance>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIALS}
    config = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": IMAGE_SIZE, "patch_size": PATCH},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, "initializer_range": init_std, "pad_token_id": ids["<pad>"],
                     "bos_token_id": ids["<s>"], "eos_token_id": ids["<end_of_utterance>"]},
        scale_factor=SCALE_FACTOR, image_token_id=ids["<image>"], pad_token_id=ids["<pad>"])
    longest = 2 * IMAGE_SIZE if image_splitting else IMAGE_SIZE
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=image_splitting, size={"longest_edge": longest},
                                                max_image_size={"longest_edge": IMAGE_SIZE},
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    seq_len = (IMAGE_SIZE // PATCH) ** 2 // SCALE_FACTOR ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                                  chat_template=IDEFICS3_TEMPLATE)
    model = seeded_model(Idefics3ForConditionalGeneration, config, seed)
    set_generation_ids(model, ids["<pad>"], ids["<end_of_utterance>"], ids["<s>"])
    return save_folder(out_dir, model, processor)


def build_smolvlm(out_dir: str | os.PathLike[str], seed: int = 0, init_std: float = INIT_STD) -> Path:
    """SmolVLM-style Idefics3: image splitting on (up to 2x2 crops of 32 px plus the global view)."""
    return build_idefics3(out_dir, seed, init_std, image_splitting=True)
