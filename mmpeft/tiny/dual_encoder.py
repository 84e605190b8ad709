"""Tiny random dual-encoder backbones (CLIP, SigLIP) built fully offline and saved as ordinary Hugging Face folders.

Tests and demos need a backbone that loads through the same `AutoModel.from_pretrained` /
`AutoProcessor.from_pretrained` code as a hub checkpoint, but no machine here reaches the Hub. These builders write
a real folder (config.json, model.safetensors, tokenizer files, preprocessor config) with random weights drawn from a
fixed seed, so every code path that handles real checkpoints is exercised, in well under a second.

Traps the builders avoid on purpose (see the offline notes):
- CLIP pools the text tower at the first position holding `text_config.eos_token_id`; it must be the tokenizer's
  `<eos>` id. Left at 49407 every caption gets the same embedding; the value 2 switches to argmax-of-ids pooling,
  so `<eos>` is given id 3.
- torchvision is not installed, so the processors use the PIL image processors (`*ImageProcessorPil`).
- SigLIP pools the last position: its text must be padded to `max_length`, as SigLIP was trained.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
)

from mmpeft.tiny.save import save_folder, seeded_model

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_WORDS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "build_word_tokenizer",
    "save_tiny_clip",
    "save_tiny_siglip",
    "tiny_clip_config",
    "tiny_siglip_config",
]

PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<bos>", "<eos>"
# Ids 0..3 in this order. <eos> is 3, not 2: CLIP treats eos_token_id == 2 as "pool at argmax of ids".
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)

# fmt: off
_PROMPT_WORDS = [
    "a", "an", "the", "this", "that", "it", "is", "are", "of", "in", "on", "with", "and", "or", "for", "to", "my",
    "there", "what", "which", "shown", "shows", "photo", "picture", "image", "drawing", "sketch", "painting",
    "rendering", "digit", "number", "class", "label", "kind", "type", "object", "thing", "small", "large", "big",
    "little", "close", "up", "cropped", "blurry", "bright", "dark", "clean", "good", "bad", "low", "high",
    "resolution", "handwritten", "written", "photograph",
]
_NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
]
_DIGITS = [str(d) for d in range(10)]
_TEST_WORDS = [
    "red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray", "grey", "cat",
    "dog", "bird", "fish", "horse", "deer", "frog", "car", "truck", "ship", "airplane", "plane", "boat", "tree",
    "flower", "apple", "house", "square", "circle", "triangle", "star", "line", "shape", "animal", "vehicle",
]
_PUNCTUATION = [".", ",", "'", "-", ":", "!", "?"]
# fmt: on


def _unique(words: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for word in words:
        seen.setdefault(word, None)
    return list(seen)


# Split like the Whitespace pre-tokenizer (`\w+|[^\w\s]+`) so every entry is a reachable token; the punctuation is
# there because "digit." is pre-tokenized to "digit" ".".
DEFAULT_WORDS: tuple[str, ...] = tuple(
    w
    for w in _unique(
        piece
        for word in [*_PROMPT_WORDS, *_NUMBER_WORDS, *_DIGITS, *_TEST_WORDS, *_PUNCTUATION]
        for piece, _ in pre_tokenizers.Whitespace().pre_tokenize_str(word)
    )
    if w not in SPECIAL_TOKENS
)


def build_word_tokenizer(words: Iterable[str] | None = None, model_max_length: int = 16) -> PreTrainedTokenizerFast:
    """A word-level tokenizer small enough for a tiny model, built without any download.

    `words` replaces `DEFAULT_WORDS` (pass `[*DEFAULT_WORDS, *extra]` to extend it); a single string is split into
    words. Words are lowercased (the normaliser lowercases input too) and split the way the Whitespace pre-tokenizer
    splits text, so every entry is reachable. Ids: <pad>=0, <unk>=1, <bos>=2, <eos>=3, then the words in order.
    Encoding adds <bos> ... <eos>.
    """
    if model_max_length < 3:
        raise ValueError(f"model_max_length must be at least 3 (<bos> word <eos>), got {model_max_length}")
    source = DEFAULT_WORDS if words is None else [words] if isinstance(words, str) else words
    splitter = pre_tokenizers.Whitespace()
    pieces = _unique(piece for word in source for piece, _ in splitter.pre_tokenize_str(str(word).lower()) if piece)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))

    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(BOS_TOKEN, bos), (EOS_TOKEN, eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )


_DEFAULT_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(DEFAULT_WORDS)
_EOS_ID = SPECIAL_TOKENS.index(EOS_TOKEN)
_BOS_ID = SPECIAL_TOKENS.index(BOS_TOKEN)
_PAD_ID = SPECIAL_TOKENS.index(PAD_TOKEN)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split `overrides` into (text_config, vision_config, top-level) updates; sub-config dicts merge key by key."""
    overrides = dict(overrides)
    text = {**base["text_config"], **dict(overrides.pop("text_config", None) or {})}
    vision = {**base["vision_config"], **dict(overrides.pop("vision_config", None) or {})}
    return text, vision, overrides


def tiny_clip_config(
    image_size: int = 24,
    patch_size: int = 4,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    mlp: int = 64,
    projection: int = 32,
    vocab_size: int = _DEFAULT_VOCAB_SIZE,
    eos_token_id: int = _EOS_ID,
    **overrides: Any,
) -> CLIPConfig:
    """A CLIPConfig of a few tens of thousands of parameters whose text pooling matches `build_word_tokenizer`.

    `vocab_size` and `eos_token_id` default to the default word tokenizer; `eos_token_id` must be the tokenizer's
    <eos> id or every caption pools the same position. `overrides` go to `CLIPConfig`; `text_config=` /
    `vision_config=` dicts are merged into the tiny sub-configs rather than replacing them.
    """
    base = {
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": mlp,
            "projection_dim": projection,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": 16,
            "pad_token_id": _PAD_ID,
            "bos_token_id": _BOS_ID,
            "eos_token_id": eos_token_id,
        },
        "vision_config": {
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_size": hidden,
            "intermediate_size": mlp,
            "projection_dim": projection,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
        },
    }
    text, vision, top = _merge(base, overrides)
    return CLIPConfig(text_config=text, vision_config=vision, **{"projection_dim": projection, **top})


def tiny_siglip_config(
    image_size: int = 24,
    patch_size: int = 4,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    mlp: int = 64,
    vocab_size: int = _DEFAULT_VOCAB_SIZE,
    max_length: int = 16,
    **overrides: Any,
) -> SiglipConfig:
    """A SiglipConfig the size of `tiny_clip_config`; `overrides` merge as in `tiny_clip_config`."""
    base = {
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": mlp,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": max_length,
            "pad_token_id": _PAD_ID,
            "bos_token_id": _BOS_ID,
            "eos_token_id": _EOS_ID,
        },
        "vision_config": {
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_size": hidden,
            "intermediate_size": mlp,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
        },
    }
    text, vision, top = _merge(base, overrides)
    return SiglipConfig(text_config=text, vision_config=vision, **top)


def _image_kwargs(image_size: int) -> dict[str, Any]:
    """Resize straight to image_size x image_size (no crop), normalise with mean/std 0.5, convert grayscale to RGB."""
    square = {"height": image_size, "width": image_size}
    return {
        "size": square,
        "do_resize": True,
        "do_center_crop": False,
        "crop_size": square,
        "do_rescale": True,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


def save_tiny_clip(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    image_size: int = 24,
    hidden: int = 32,
    layers: int = 2,
    words: Iterable[str] | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Save a random CLIPModel + CLIPProcessor to `out_dir`, loadable with AutoModel / AutoProcessor offline.

    The same arguments give byte-identical weights; `words` sets the tokenizer vocabulary (and the model's vocab size).
    """
    tokenizer = build_word_tokenizer(words)
    overrides = dict(config_overrides or {})
    overrides.setdefault("text_config", {})
    overrides["text_config"] = {"max_position_embeddings": tokenizer.model_max_length, **overrides["text_config"]}
    config = tiny_clip_config(
        image_size=image_size,
        hidden=hidden,
        layers=layers,
        projection=hidden,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    image_processor = CLIPImageProcessorPil(**_image_kwargs(config.vision_config.image_size))
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return save_folder(out_dir, seeded_model(CLIPModel, config, seed), processor)


def save_tiny_siglip(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    image_size: int = 24,
    hidden: int = 32,
    layers: int = 2,
    words: Iterable[str] | None = None,
) -> Path:
    """Save a random SiglipModel + SiglipProcessor to `out_dir`, loadable with AutoModel / AutoProcessor offline.

    SigLIP pools the last text position, so call the processor with `padding="max_length"` (the tokenizer's
    `model_max_length` equals the text tower's `max_position_embeddings`).
    """
    tokenizer = build_word_tokenizer(words)
    config = tiny_siglip_config(
        image_size=image_size,
        hidden=hidden,
        layers=layers,
        vocab_size=len(tokenizer),
        max_length=tokenizer.model_max_length,
    )
    image_processor = SiglipImageProcessorPil(**_image_kwargs(image_size))
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return save_folder(out_dir, seeded_model(SiglipModel, config, seed), processor)


