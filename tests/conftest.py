"""Tests run offline on tiny backbones built locally; nothing is downloaded.

Built backbones (the tiny random ones, the pre-trained digits CLIP) go to a cache inside the checkout, so a test
run pays for each at most once and never touches the user's own cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MMPEFT_CACHE", str(Path(__file__).resolve().parent.parent / ".test-cache"))
torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting, and timing-independent

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}


def write_color_folder(root: Path, per_class: int = 24, seed: int = 0) -> Path:
    """A learnable image folder: noisy solid-colour 12x12 images, one sub-folder per colour."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def color_folder(tmp_path_factory) -> Path:
    return write_color_folder(tmp_path_factory.mktemp("colors"))


@pytest.fixture(scope="session")
def tiny_clip_dir() -> Path:
    from mmpeft.testing import tiny_backbone

    return tiny_backbone("clip")


@pytest.fixture(scope="session")
def tiny_siglip_dir() -> Path:
    from mmpeft.testing import tiny_backbone

    return tiny_backbone("siglip")


@pytest.fixture(scope="session")
def digits_clip_dir() -> Path:
    """The pre-trained demo backbone, built (one to two minutes) only if the test cache lacks it."""
    from mmpeft.runs.demo import build_digits_clip

    return build_digits_clip()


@pytest.fixture
def color_recipe(color_folder, tiny_clip_dir, tmp_path) -> dict:
    """A quick recipe on the colour folder: learnable in a few epochs on a random tiny CLIP."""
    return {
        "name": "colors",
        "seed": 0,
        "backbone": {"id": str(tiny_clip_dir)},
        "data": {"source": "folder", "path": str(color_folder), "templates": ["a photo of a {label} image."],
                 "split": {"val": 0.25, "test": 0.25}},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 4, "batch_size": 8, "lr": 0.02, "warmup_ratio": 0.0},
        "eval": {"batch_size": 32},
        "output": {"dir": str(tmp_path / "runs"), "name": "run"},
    }


@pytest.fixture(scope="session")
def ui_runs_dir(tmp_path_factory, color_folder, tiny_clip_dir) -> Path:
    """A runs folder as `mmpeft ui` finds it: one finished 1-epoch LoRA run and a finished 2-cell compare grid."""
    import mmpeft

    root = tmp_path_factory.mktemp("ui-runs")
    recipe = {"name": "colors", "seed": 0, "backbone": {"id": str(tiny_clip_dir)},
              "data": {"source": "folder", "path": str(color_folder), "templates": ["a photo of a {label} image."],
                       "split": {"val": 0.25, "test": 0.25}},
              "method": {"name": "lora", "r": 4, "alpha": 8},
              "train": {"epochs": 1, "batch_size": 12, "lr": 0.02, "warmup_ratio": 0.0},
              "eval": {"batch_size": 32}, "output": {"dir": str(root), "name": "lora-run"}}
    mmpeft.run(recipe)
    grid = {k: v for k, v in recipe.items() if k != "method"}
    grid.update(output={"dir": str(root), "name": "grid"}, grid={"methods": ["linear_probe", "bitfit"], "seeds": [0]})
    mmpeft.compare(grid)
    return root
