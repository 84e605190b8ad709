"""Named demo backbones (`backbone.id: mmpeft-demo/<name>`), built locally into the cache: no hub needed."""

from __future__ import annotations

from pathlib import Path

from mmpeft.backbones import DEMO_BACKBONES


@DEMO_BACKBONES.register("mmpeft-demo/tiny-clip")
def tiny_clip() -> Path:
    """Random weights: zero-shot is chance level. For wiring checks, not for numbers."""
    from mmpeft.testing import tiny_backbone

    return tiny_backbone("clip")


@DEMO_BACKBONES.register("mmpeft-demo/tiny-siglip")
def tiny_siglip() -> Path:
    from mmpeft.testing import tiny_backbone

    return tiny_backbone("siglip")


@DEMO_BACKBONES.register("mmpeft-demo/tiny-llava")
def tiny_llava() -> Path:
    """A random tiny LLaVA (generative; about 70k parameters): for wiring checks and CPU demos, not for numbers."""
    from mmpeft.testing import tiny_backbone

    return tiny_backbone("llava")


@DEMO_BACKBONES.register("mmpeft-demo/tiny-qwen2vl")
def tiny_qwen2vl() -> Path:
    """A random tiny Qwen2-VL (generative; about 90k parameters), saved with the image-only processor."""
    from mmpeft.testing import tiny_backbone

    return tiny_backbone("qwen2vl")


@DEMO_BACKBONES.register("mmpeft-demo/digits-clip")
def digits_clip() -> Path:
    """A 267k-parameter CLIP pre-trained by mmpeft on 1,078 real digit scans; built once (about a minute)."""
    from mmpeft.backbones.digits_clip import build_digits_clip

    return build_digits_clip()


@DEMO_BACKBONES.register("mmpeft-demo/digits-clip-config")
def digits_clip_config() -> Path:
    """digits-clip's architecture, tokenizer and processor with random weights: where its pre-training starts."""
    from mmpeft.backbones.digits_clip import config_dir

    return config_dir()
