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
