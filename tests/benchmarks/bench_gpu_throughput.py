"""GPU throughput: mmpeft's training step vs a minimal torch+peft step on the same ViT-B/16-sized CLIP and inputs.

    python tests/benchmarks/bench_gpu_throughput.py            # CUDA: full, LoRA, QLoRA; bf16
    python tests/benchmarks/bench_gpu_throughput.py --smoke    # a tiny CLIP on CPU, to check the script runs

What is left here is the overhead of mmpeft's step (accelerate, the objective, clipping, scheduler) over a hand-written
one: the ratio of their samples/s. Everything else (the backbone built from config, the step, the timing, FLOPs
counted by FlopCounterMode, the bf16 peak table) is tests/benchmarks/gpu_suite.py's, which reports samples/s, MFU
and peak memory against `mmpeft plan` for every method; run that for the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_suite import (
    CLASSES,
    FULL,
    SMOKE,
    StepBench,
    build_clip_folder,
    measure,
    method_recipe,
    peak_tflops,
    pixel_batch,
    quiet,
    size,
    with_mfu,
)

CASES = {"full": ("full", None), "lora": ("lora-r8", None),
         "qlora": ("lora-r8", {"bits": 4, "compute_dtype": "bfloat16"})}


class HandStep:
    """The same backbone stepped by hand: both towers, cosine logits x 100, cross-entropy, AdamW; no accelerate."""

    def __init__(self, bench: StepBench):
        self.device, self.baseline, self.backbone = bench.device, bench.baseline, bench.backbone
        self.model = bench.backbone.model
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        labels = bench.labels
        self.tokens = self.backbone.tokenize([labels.prompts(i)[0] for i in range(len(labels))])

    def step(self, batch: dict) -> float:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            pixels = batch["pixel_values"].to(self.backbone.base_model.dtype)
            image = F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
            text = F.normalize(self.model.get_text_features(**self.tokens).pooler_output.float(), dim=-1)
            loss = F.cross_entropy(image @ text.t() * 100.0, batch["labels"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def recipe(folder: Path, case: str, batch: int, device: str) -> dict:
    preset, quantization = CASES[case]
    return {"name": f"throughput-{case}",
            "backbone": {"id": str(folder), "dtype": "bfloat16" if device == "cuda" else "float32",
                         "quantization": quantization},
            "method": method_recipe(preset),
            "data": {"source": "digits", "classes": CLASSES},
            "train": {"batch_size": batch, "epochs": 1, "lr": 1e-5, "warmup_ratio": 0.0, "max_grad_norm": None,
                      "mixed_precision": "bf16" if device == "cuda" else "no"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU: checks the script, no figures")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("skipped: no CUDA device (use --smoke to check the script on CPU)")
        return
    quiet()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = SMOKE if args.smoke else dataclasses.replace(FULL, batch=args.batch, steps=args.steps,
                                                         min_steps=args.steps)
    peak, source = peak_tflops(device, None)
    cases = ["full", "lora"] + (["qlora"] if device == "cuda" else [])
    print(f"device: {device}; torch {torch.__version__}; batch {sizes.batch}; {sizes.steps} timed steps; "
          f"{len(CLASSES)} labels; MFU peak: {source}")
    print("| method | loop | samples/s | peak memory | MFU | vs hand loop |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_clip_folder(Path(tmp) / "clip", args.smoke)
        for case in cases:
            rates: dict[str, float] = {}
            for loop in ("hand", "mmpeft"):  # a fresh backbone per loop: neither inherits the other's state
                bench = StepBench(recipe(folder, case, sizes.batch, device), device, Path(tmp) / "run")
                stepper = HandStep(bench) if loop == "hand" else bench
                row = measure(stepper, pixel_batch(folder, sizes.batch, len(CLASSES), device), sizes.batch, sizes)
                with_mfu(row, row["flops_per_step"], (peak, source))
                rates[loop] = row["samples_per_second"]
                ratio = f"{rates['mmpeft'] / rates['hand']:.3f}" if loop == "mmpeft" else ""
                mfu = f"{row['mfu']:.1%}" if row.get("mfu") else "n/a"
                print(f"| {case} | {loop} | {rates[loop]:.1f} | {size(row['peak_bytes'])} | {mfu} | {ratio} |")
                stepper = None
                bench.close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
