"""`tiny_backbone(kind)`: a cached tiny random backbone folder, built once (demo names and tests use it)."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from mmpeft.core.io import cache_dir
from mmpeft.tiny.dual_encoder import save_tiny_clip, save_tiny_siglip
from mmpeft.tiny.generative import (
    build_gemma3,
    build_idefics3,
    build_llava,
    build_paligemma,
    build_qwen2vl,
    build_qwen25vl,
    build_smolvlm,
)

_BUILDERS = {"clip": save_tiny_clip, "siglip": save_tiny_siglip, "llava": build_llava, "qwen2vl": build_qwen2vl,
             "qwen25vl": build_qwen25vl, "idefics3": build_idefics3, "smolvlm": build_smolvlm,
             "paligemma": build_paligemma, "gemma3": build_gemma3}
GENERATIVE_KINDS = ("llava", "idefics3", "smolvlm", "qwen2vl", "qwen25vl", "paligemma", "gemma3")
TinyKind = Literal["clip", "siglip", "llava", "idefics3", "smolvlm", "qwen2vl", "qwen25vl", "paligemma", "gemma3"]
# Bump a kind's version when its builder changes what it writes: from version 2 on, the version is part of the
# folder name, so a new folder is built and checkouts of older code sharing the cache keep reading theirs.
_BUILD_VERSIONS = {"qwen2vl": 2}  # 2: stock processor class name recorded, 4 to 16 image tokens by image shape
_MARKER = "mmpeft-tiny.json"


def _is_complete(path: Path, marker: dict[str, Any]) -> bool:
    try:
        return json.loads((path / _MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def tiny_backbone(kind: TinyKind = "clip", seed: int = 0) -> Path:
    """Path of a cached tiny backbone under `cache_dir("tiny-backbones")` (`{kind}-{seed}`, `-v{version}` appended
    from version 2), built on first use. `smolvlm` is Idefics3 with image splitting.

    The folder is written to a temporary sibling and renamed into place, so a killed build never leaves a half
    folder and concurrent callers either find the finished folder or build their own copy and discard it.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny backbone kind {kind!r}; expected one of {sorted(_BUILDERS)}")
    root = cache_dir("tiny-backbones")
    version = _BUILD_VERSIONS.get(kind, 1)
    target = root / (f"{kind}-{seed}" if version == 1 else f"{kind}-{seed}-v{version}")
    marker = {"kind": kind, "seed": seed, "build_version": version}
    if _is_complete(target, marker):
        return target

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        _BUILDERS[kind](tmp, seed=seed)
        (tmp / _MARKER).write_text(json.dumps(marker) + "\n")
        _install(tmp, target, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _install(tmp: Path, target: Path, marker: dict[str, Any]) -> None:
    """Rename the finished build `tmp` onto `target`, moving aside an empty, half or stale folder first."""
    try:
        tmp.replace(target)  # succeeds when target is absent or an empty folder
        return
    except OSError:
        if _is_complete(target, marker):  # another process finished first: keep theirs
            return
    # Stale or foreign contents: move them aside (one rename, atomic), install ours, then delete the old copy.
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    with contextlib.suppress(FileNotFoundError):
        target.replace(trash / "old")
    try:
        tmp.replace(target)
    except OSError:
        if not _is_complete(target, marker):
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
