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
