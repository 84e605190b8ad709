"""Tiny random generative VLMs (LLaVA, Qwen2-VL) built offline and saved as ordinary Hugging Face folders.

Like the dual encoders of `mmpeft.tiny.dual_encoder`, they load through `AutoModelForImageTextToText` +
`AutoProcessor`, so tests exercise the code path real checkpoints take. Each gets a byte-level BPE tokenizer trained
here on a few sentences (bytes cover any text, so nothing is ever unknown), a small Jinja chat template and a PIL
image processor.

What the builders get right on purpose (see the offline notes):
- the image tokens the processor writes equal the features the vision tower makes (LLaVA: 32 px / patch 8 = 16
  patches, the CLS token dropped by the "default" feature strategy; Qwen2-VL: 32 px / patch 8 / merge 2 = 4 tokens);
- Qwen2-VL's processor is the image-only variant (no torchvision), and `mrope_section` sums to head_dim / 2;
- chat templates put the answer right after the generation prompt and end it with the end-of-turn token, which is
  what answer scoring and answer-only labels rely on.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmpeft.tiny.save import save_folder, seeded_model

__all__ = ["CORPUS", "build_bpe_tokenizer", "build_llava", "build_qwen2vl"]

IMAGE_SIZE = 32
# Weight scale of the random models. transformers' default (0.02) suits wide models; at width 32 it caps every logit
# near zero (|lm_head row| x |normed hidden| ~ 0.1 x 5.7), so a frozen random head could never become confident and
# LoRA on inner layers would barely move the loss.
INIT_STD = 0.3
CORPUS = (
    "What is in the image? What digit is this? What number is shown? What colour is this image? Which shape is it?",
    "It is a photo of the digit seven. The answer is three. This is a handwritten number.",
    "zero one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9 ten",
    "red green blue yellow black white orange purple pink brown gray cat dog bird car tree square circle triangle",
    "Describe the picture. A small red square on a dark background. Yes no maybe.",
    "USER: ASSISTANT: user assistant system",
    " zero one two three four five six seven eight nine red green blue",  # leading spaces: answer words after ": "
)
LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")


def build_bpe_tokenizer(special_tokens: tuple[str, ...], vocab_size: int = 400, **roles) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `CORPUS`; `special_tokens` get the first ids; `roles` name bos/eos/pad tokens.

    No post-processor: nothing is added on encode, the chat templates write every marker themselves.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=512, padding_side="right", **roles)


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
    _set_generation_ids(model, ids["<pad>"], ids["</s>"], ids["<s>"])
    return save_folder(out_dir, model, processor)


def build_qwen2vl(out_dir: str | os.PathLike[str], seed: int = 0, init_std: float = INIT_STD) -> Path:
    """Qwen2-VL: a 2-block vision transformer (patch 8, 2x2 merge) and a tiny Qwen2 with M-RoPE (about 90k params)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from mmpeft.backbones.image_only import Qwen2VLImageOnlyProcessor
    tokenizer = build_bpe_tokenizer(QWEN_SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    config = Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2,
                       "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512, "initializer_range": init_std, "bos_token_id": None,
                     "pad_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"],
                     # head_dim 8: the temporal/height/width sections must sum to head_dim / 2
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                               min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=CHATML_TEMPLATE)
    model = seeded_model(Qwen2VLForConditionalGeneration, config, seed)
    _set_generation_ids(model, ids["<|endoftext|>"], ids["<|im_end|>"], None)
    return save_folder(out_dir, model, processor)


def _set_generation_ids(model, pad: int, eos: int, bos: int | None) -> None:
    """`generate()` stops at the template's end-of-turn token and pads with the tokenizer's pad token."""
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = bos
