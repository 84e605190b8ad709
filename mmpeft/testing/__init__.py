"""Helpers for tests, benchmarks and notebooks (beside the layers: production code never imports this package).

The tiny random backbones themselves are production code in `mmpeft.tiny` (demo names such as
`mmpeft-demo/tiny-clip` build them); this package gathers them under one import and registers the demo names.
"""

from __future__ import annotations

import mmpeft.runs.demo  # noqa: F401  (registers the mmpeft-demo/... names, as a command-line run does)
from mmpeft.tiny.dual_encoder import (
    BOS_TOKEN,
    DEFAULT_WORDS,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    build_word_tokenizer,
    save_tiny_clip,
    save_tiny_siglip,
    tiny_clip_config,
    tiny_siglip_config,
)
from mmpeft.tiny.generative import build_gemma3 as save_tiny_gemma3
from mmpeft.tiny.generative import build_idefics3 as save_tiny_idefics3
from mmpeft.tiny.generative import build_llava as save_tiny_llava
from mmpeft.tiny.generative import build_paligemma as save_tiny_paligemma
from mmpeft.tiny.generative import build_qwen2vl as save_tiny_qwen2vl
from mmpeft.tiny.generative import build_qwen25vl as save_tiny_qwen25vl
from mmpeft.tiny.generative import build_smolvlm as save_tiny_smolvlm
from mmpeft.tiny.store import GENERATIVE_KINDS, tiny_backbone

__all__ = [
    "BOS_TOKEN", "DEFAULT_WORDS", "EOS_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "UNK_TOKEN", "build_word_tokenizer",
    "save_tiny_clip", "save_tiny_llava", "save_tiny_qwen2vl", "save_tiny_siglip", "tiny_backbone",
    "tiny_clip_config", "tiny_siglip_config",
    "GENERATIVE_KINDS", "save_tiny_gemma3", "save_tiny_idefics3", "save_tiny_paligemma", "save_tiny_qwen25vl",
    "save_tiny_smolvlm",
]
