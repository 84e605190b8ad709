"""Processor outputs of generative backbones (token ids, pixel values, image grids) kept per example.

Why: a generative processor tokenizes the prompt and resizes, patches and normalises every image on every step;
for the same prompt and the same image it returns the same tensors each epoch and evaluation pass. The key is the
rendered text plus the images' pixels, so an augmented image (new pixels) is simply a new entry; the least
recently used entries go first past a size limit.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from PIL import Image

DEFAULT_LIMIT_MB = 512  # MMPEFT_ENCODED_CACHE_MB; 0 turns the cache off


def encoded_key(text: str, images: Sequence[Image.Image], extra: str = "") -> str:
    digest = hashlib.sha1(f"{extra}\0{text}\0{len(images)}".encode())
    for image in images:
        digest.update(f"{image.mode}:{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


class EncodedCache:
    """key -> processor tensors, least recently used first out; hands out copies, so callers may change them."""

    def __init__(self, limit_bytes: int | None = None):
        default = float(os.environ.get("MMPEFT_ENCODED_CACHE_MB", DEFAULT_LIMIT_MB)) * 2 ** 20
        self.limit = int(default if limit_bytes is None else limit_bytes)
        self.entries: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get_or_make(self, key: str, make: Callable[[], dict]) -> dict:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            entry = make()
            size = sum(v.numel() * v.element_size() for v in entry.values() if torch.is_tensor(v))
            if self.limit > 0 and size <= self.limit:
                self.entries[key] = entry
                self.bytes += size
                while self.bytes > self.limit:
                    _, old = self.entries.popitem(last=False)
                    self.bytes -= sum(v.numel() * v.element_size() for v in old.values() if torch.is_tensor(v))
        else:
            self.hits += 1
            self.entries.move_to_end(key)
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in entry.items()}
