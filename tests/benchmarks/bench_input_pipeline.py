"""The input pipeline on photo-sized JPEGs: mmpeft's default loading against the same model on pixels decoded up front.

    python tests/benchmarks/bench_input_pipeline.py [--images 800] [--epochs 3] [--repeats 3] [--smoke]

Prints, from one process with the sides alternating and the best of `repeats` kept for each:
  - samples/s of mmpeft with default settings (data.image_cache: auto, train.num_workers: auto) over `epochs`
    epochs, timed from before the first epoch (so its decoding and caching count), with a cold cache each time;
  - samples/s of the same Trainer, model, batches and steps on pixel tensors preprocessed before timing (the ceiling);
  - their ratio (target on 2 quiet cores: >= 0.85);
  - the wall time of a 3-method x 2-seed compare grid on the folder with data.image_cache auto and off (target:
    the cached grid >= 2.5x faster).
`--smoke` runs tiny sizes to check the script works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

CLASSES = ("apple", "boat", "cloud", "dog")


def write_photos(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`count` JPEGs (width x height `size`) in one folder per class: smooth colour fields with grain, like photos."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        label = CLASSES[i % len(CLASSES)]
        base = np.array([60, 110, 160, 210][i % len(CLASSES)], dtype=np.float32)
        fx, fy, phase = rng.uniform(0.005, 0.03), rng.uniform(0.005, 0.03), rng.uniform(0, 6.3, 3)
        channels = [base + 40 * np.sin(fx * x + fy * y + p) for p in phase]
        pixels = np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def make_recipe(folder: Path, backbone_dir: Path, out_dir: Path, epochs: int, batch_size: int) -> dict:
    return {
        "name": "bench-input", "seed": 0,
        "backbone": {"id": str(backbone_dir)},
        "data": {"source": "folder", "path": str(folder), "templates": ["a photo of a {label}."],
                 "split": {"val": 0.1, "test": 0.2}},
        "method": {"name": "lora", "r": 8, "alpha": 16, "towers": ["vision"]},
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": 1e-3, "warmup_ratio": 0.0},
        "eval": {"batch_size": 64, "zero_shot": False},
        "output": {"dir": str(out_dir), "name": None},
    }


def cold_cache() -> None:
    """Forget every decoded image (memory and disk), so each measurement decodes its images itself."""
    from mmpeft.core.io import cache_dir
    from mmpeft.data.image_cache import IMAGE_CACHE

    IMAGE_CACHE.clear()
    shutil.rmtree(cache_dir("images"), ignore_errors=True)


class PixelItems(torch.utils.data.Dataset):
    """Pixel tensors preprocessed before timing: the ceiling an input pipeline can approach."""

    accepts_epoch_keys = True

    def __init__(self, pixels: torch.Tensor, labels: list[int]):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        pass  # nothing random to reseed

    def __getitem__(self, key) -> dict:
        index = key[1] if isinstance(key, tuple) else key
        return {"pixel_values": self.pixels[index], "label": self.labels[index], "index": index}

    @staticmethod
    def collate(items: list[dict]) -> dict:
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
                "labels": torch.tensor([item["label"] for item in items]),
                "index": torch.tensor([item["index"] for item in items])}


def train_once(recipe, data, train_set, run_dir: Path) -> float:
    """samples/s of Trainer.fit on `train_set`, wall time from before the first epoch; no checkpoints or val."""
    from mmpeft.data.loader import loader_settings
    from mmpeft.objectives import make_objective
    from mmpeft.runs.build import build
    from mmpeft.train import Trainer

    torch.manual_seed(0)
    backbone = build(recipe, data.labels)
    objective = make_objective("classification", backbone, data.labels)
    with loader_settings(recipe.data.image_cache, recipe.train.num_workers):
        trainer = Trainer(backbone, objective, train_set, recipe.train, recipe.seed, run_dir)
        trainer.save_checkpoint = lambda: None  # the ceiling saves nothing either
        start = time.perf_counter()
        progress = trainer.fit()
        seconds = time.perf_counter() - start
    return progress.samples_seen / seconds


def throughput(recipe, repeats: int, work: Path) -> tuple[float, float]:
    from mmpeft.backbones import load_backbone
    from mmpeft.data import load_data, load_image

    data = load_data(recipe.data, recipe.seed)
    processor = load_backbone(recipe.backbone)
    print(f"CLIP with {sum(p.numel() for p in processor.parameters()) / 1e6:.2f}M parameters; "
          f"{len(data.train)} training images", flush=True)
    images = [load_image(example.image).convert("RGB") for example in data.train]
    ceiling_set = PixelItems(processor.preprocess(images), [example.label for example in data.train])
    best_default = best_ceiling = 0.0
    for repeat in range(repeats):
        sides = ["ceiling", "default"] if repeat % 2 == 0 else ["default", "ceiling"]
        for side in sides:
            if side == "default":
                cold_cache()
                rate = train_once(recipe, data, data.dataset("train", seed=recipe.seed), work / f"d{repeat}")
                best_default = max(best_default, rate)
            else:
                rate = train_once(recipe, data, ceiling_set, work / f"c{repeat}")
                best_ceiling = max(best_ceiling, rate)
            print(f"  repeat {repeat + 1} {side:8s} {rate:8.1f} samples/s", flush=True)
    return best_default, best_ceiling


def grid_seconds(recipe: dict, cache: str, out_dir: Path) -> float:
    import mmpeft

    cold_cache()
    grid = {**{k: v for k, v in recipe.items() if k != "method"}, "name": f"grid-{cache}",
            "output": {"dir": str(out_dir), "name": None},
            "data": {**recipe["data"], "image_cache": cache},
            "grid": {"methods": ["lora", "bitfit", "ia3"], "seeds": [0, 1]}}
    start = time.perf_counter()
    mmpeft.compare(grid)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid-repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, measures nothing")
    args = parser.parse_args()
    size, image_size, batch = (400, 300), 224, 32
    if args.smoke:
        args.images, args.repeats, args.grid_repeats, args.epochs = 48, 1, 1, 2
        size, image_size, batch = (80, 60), 32, 8
    from mmpeft.runs.recipe import load_recipe
    from mmpeft.testing import save_tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["MMPEFT_CACHE"] = str(work / "cache")  # a cold disk cache, and nothing left behind
        folder = write_photos(work / "photos", args.images, size)
        words = ["a", "photo", "of", *CLASSES, "."]
        clip = save_tiny_clip(work / "clip", image_size=image_size, hidden=192, layers=4, words=words,
                              config_overrides={"patch_size": 32 if not args.smoke else 8})
        plain = make_recipe(folder, clip, work / "runs", args.epochs, batch)
        print(f"{args.images} JPEGs {size[0]}x{size[1]}, CLIP at {image_size} px, LoRA r8 (vision), batch {batch}, "
              f"{args.epochs} epochs, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
        default, ceiling = throughput(load_recipe(plain), args.repeats, work / "train")
        print(f"mmpeft defaults: {default:.1f} samples/s; ceiling (pixels decoded up front): {ceiling:.1f} "
              f"samples/s; ratio {default / ceiling:.2f}x (target >= 0.85x)")
        on = off = float("inf")
        for repeat in range(args.grid_repeats):
            for cache in (("auto", "off") if repeat % 2 == 0 else ("off", "auto")):
                seconds = grid_seconds(plain, cache, work / "grids")
                print(f"  grid repeat {repeat + 1} image_cache {cache:4s} {seconds:7.1f} s", flush=True)
                if cache == "auto":
                    on = min(on, seconds)
                else:
                    off = min(off, seconds)
        print(f"compare grid (3 methods x 2 seeds): cache on {on:.1f} s, off {off:.1f} s; {off / on:.2f}x faster "
              "with the cache (target >= 2.5x)")


if __name__ == "__main__":
    main()
