"""Tiny random generative VLMs of every family mmpeft supports (LLaVA, Idefics3 with and without image splitting,
Qwen2-VL, Qwen2.5-VL, PaliGemma, Gemma3), built offline and saved as ordinary Hugging Face folders.

Like the dual encoders of `mmpeft.tiny.dual_encoder`, they load through `AutoModelForImageTextToText` +
`AutoProcessor`, so tests exercise the code path real checkpoints take. Each gets a byte-level BPE tokenizer, a small
Jinja chat template and a PIL image processor. What every builder gets right on purpose (see the offline notes):
the image tokens the processor writes equal the features the vision tower makes, and the chat template puts the
answer right after the generation prompt and ends it with the end-of-turn token, which answer scoring and
answer-only labels rely on.
"""

from mmpeft.tiny.generative.common import CORPUS, build_bpe_tokenizer
from mmpeft.tiny.generative.gemma import build_gemma3, build_paligemma
from mmpeft.tiny.generative.idefics3 import build_idefics3, build_smolvlm
from mmpeft.tiny.generative.llava import build_llava
from mmpeft.tiny.generative.qwen import build_qwen2vl, build_qwen25vl

__all__ = ["CORPUS", "build_bpe_tokenizer", "build_gemma3", "build_idefics3", "build_llava", "build_paligemma",
           "build_qwen25vl", "build_qwen2vl", "build_smolvlm"]
