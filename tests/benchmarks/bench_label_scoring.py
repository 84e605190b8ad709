"""Label scoring on generative backbones: all labels of an image in one continuation forward after a shared prompt
prefix (mmpeft.backbones.scoring.score_answers) vs one full forward per (image, label).

    python tests/benchmarks/bench_label_scoring.py [--kind llava|qwen2vl|both] [--images 16] [--labels 10]

Checks that both give the same scores (assert close), then prints images/s for each and their ratio (target: >= 3x
for 10 labels). Both run in this one process, alternating, best of `--repeats`; `--threads 1` by default because on
a shared CPU the tiny models' matmuls are cheaper than thread hand-offs.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmpeft.backbones import load_backbone  # noqa: E402
from mmpeft.backbones.scoring import score_answers, score_answers_per_label  # noqa: E402
from mmpeft.runs.recipe import BackboneSpec  # noqa: E402
from mmpeft.testing import tiny_backbone  # noqa: E402

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "red", "green", "blue",
          "yellow", "black", "white", "cat", "dog", "bird", "tree"]


def bench(kind: str, images: int, labels: int, repeats: int) -> float:
    backbone = load_backbone(BackboneSpec(id=str(tiny_backbone(kind))))
    rng = np.random.default_rng(0)
    pictures = [[Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))] for _ in range(images)]
    texts = [backbone.prompt_text("What digit is this?")] * images
    answers = [backbone.answer_ids(name) for name in LABELS[:labels]]
    with torch.no_grad():
        shared = score_answers(backbone, texts, pictures, answers)
        reference = score_answers_per_label(backbone, texts, pictures, answers)
        torch.testing.assert_close(shared, reference, rtol=1e-4, atol=1e-4)
        best = {"shared prefix": float("inf"), "per label": float("inf")}
        for _ in range(repeats):
            for name, score in (("shared prefix", score_answers), ("per label", score_answers_per_label)):
                tic = time.perf_counter()
                score(backbone, texts, pictures, answers)
                best[name] = min(best[name], time.perf_counter() - tic)
    lengths = sorted({len(a) for a in answers})
    print(f"{kind}: {images} images x {labels} labels (answer lengths {lengths} tokens), scores equal "
          f"(max |diff| {float((shared - reference).abs().max()):.2e})")
    for name, seconds in best.items():
        print(f"  {name:>13}: {images / seconds:8.1f} images/s  ({seconds * 1000:.0f} ms)")
    ratio = best["per label"] / best["shared prefix"]
    print(f"  ratio: {ratio:.1f}x (target >= 3x)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("llava", "qwen2vl", "both"), default="both")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = ("llava", "qwen2vl") if args.kind == "both" else (args.kind,)
    ratios = [bench(kind, args.images, args.labels, args.repeats) for kind in kinds]
    print(f"torch {torch.__version__}, {args.threads} thread(s); lowest ratio {min(ratios):.1f}x")


if __name__ == "__main__":
    main()
