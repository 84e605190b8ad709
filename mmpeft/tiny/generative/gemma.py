"""Tiny PaliGemma and Gemma3: a SigLIP vision tower (32 px, patch 8) and a tiny Gemma.

PaliGemma: the image processor's `image_seq_length` (16 patches) is set before the processor is built, and the
processor adds 1,024 `<loc>` and 128 `<seg>` tokens, so the vocabulary is sized after it. Gemma3: the projector
average-pools the 4x4 patches to `mm_tokens_per_image` = 4 and multiplies by a bare weight matrix (no linear layer,
so LoRA cannot target it); the tokenizer's extra special tokens name the boi/eoi/image tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mmpeft.tiny.generative.common import IMAGE_SIZE, INIT_STD, build_bpe_tokenizer, set_generation_ids
from mmpeft.tiny.save import save_folder, seeded_model

__all__ = ["build_gemma3", "build_paligemma"]

PATCH = 8
PALIGEMMA_TEMPLATE = (  # PaliGemma's processor adds <bos> after the last image and "\n" after the prompt itself
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else "
    "message['role'] }}{{ '\n' }}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model{{ '\n' }}{% endif %}"
)
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": IMAGE_SIZE, "patch_size": PATCH}


def _gemma_text(vocab_size: int, init_std: float, ids: dict, **extra) -> dict:
    return {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 1024,
            "initializer_range": init_std, "pad_token_id": ids["<pad>"], "bos_token_id": ids["<bos>"],
            "eos_token_id": ids["<eos>"], **extra}


def build_paligemma(out_dir: str | os.PathLike[str], seed: int = 0, init_std: float = INIT_STD) -> Path:
    """PaliGemma: SigLIP vision (16 patch tokens), a linear projector and a tiny Gemma."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    specials = ("<pad>", "<bos>", "<eos>", "<image>")
    tokenizer = build_bpe_tokenizer(specials, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                    extra_special_tokens={"image_token": "<image>"})
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor.image_seq_length = (IMAGE_SIZE // PATCH) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=PALIGEMMA_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    config = PaliGemmaConfig(vision_config={**VISION, "projection_dim": 32},
                             text_config={"model_type": "gemma", **_gemma_text(len(tokenizer), init_std, ids)},
                             image_token_index=ids["<image>"], projection_dim=32, pad_token_id=ids["<pad>"])
    model = seeded_model(PaliGemmaForConditionalGeneration, config, seed)
    set_generation_ids(model, ids["<pad>"], ids["<eos>"], ids["<bos>"])
    return save_folder(out_dir, model, processor)


def build_gemma3(out_dir: str | os.PathLike[str], seed: int = 0, init_std: float = INIT_STD) -> Path:
    """Gemma3: SigLIP vision, an average-pool + bare-weight projector (4 image tokens) and a tiny Gemma3 text model."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    specials = ("<pad>", "<bos>", "<eos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
                "<start_of_turn>", "<end_of_turn>")
    tokenizer = build_bpe_tokenizer(specials, pad_token="<pad>", bos_token="<bos>", eos_token="<end_of_turn>",
                                    extra_special_tokens={"boi_token": "<start_of_image>",
                                                          "eoi_token": "<end_of_image>",
                                                          "image_token": "<image_soft_token>"})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    ids["<eos>"] = ids["<end_of_turn>"]
    tokens_per_image = 4
    config = Gemma3Config(
        vision_config=VISION,
        text_config=_gemma_text(len(tokenizer), init_std, ids, sliding_window=64, query_pre_attn_scalar=8),
        mm_tokens_per_image=tokens_per_image, boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"])
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE,
                                image_seq_length=tokens_per_image)
    model = seeded_model(Gemma3ForConditionalGeneration, config, seed)
    # transformers initialises the projector's weight matrix to zeros: every image would look the same (blank)
    projector = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        projector.normal_(0.0, init_std)
    set_generation_ids(model, ids["<pad>"], ids["<end_of_turn>"], ids["<bos>"])
    return save_folder(out_dir, model, processor)
