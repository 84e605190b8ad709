"""GPU throughput: mmpeft's loop vs a minimal torch+peft loop on a ViT-B/16-sized CLIP built from config.

    python tests/benchmarks/bench_gpu_throughput.py            # CUDA: full, LoRA, QLoRA; bf16, SDPA
    python tests/benchmarks/bench_gpu_throughput.py --smoke    # a tiny config on CPU, to check the script runs

Prints samples/s, peak GPU memory and model FLOPs utilisation (MFU) per method, and the ratio to the hand loop.
FLOPs: 2 x params x tokens for the forward of both towers, plus 4 x (params upstream of a trainable parameter)
x tokens for the backward (6 x params x tokens when everything trains). Skips cleanly without CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def build_folder(folder: str, smoke: bool) -> str:
    from mmpeft.testing import save_tiny_clip

    if smoke:
        return str(save_tiny_clip(folder, hidden=64, layers=2))
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "image_size": 224, "patch_size": 16}
    text = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
            "max_position_embeddings": 77}
    return str(save_tiny_clip(folder, image_size=224, config_overrides={
        "vision_config": vision, "text_config": text, "projection_dim": 512}))


def make_backbone(path: str, method: str, smoke: bool):
    from mmpeft.backbones import load_backbone
    from mmpeft.methods import METHODS
    from mmpeft.runs.recipe import load_recipe
    from mmpeft.specs import BackboneSpec, QuantizationSpec

    quantization = QuantizationSpec(bits=4, compute_dtype="bfloat16") if method == "qlora" else None
    dtype = "float32" if smoke else "bfloat16"
    spec = BackboneSpec(id=path, dtype=dtype, quantization=quantization)
    backbone = load_backbone(spec)
    if quantization is None:
        backbone.to("cuda" if torch.cuda.is_available() else "cpu")
    name = "full" if method == "full" else "lora"
    recipe = load_recipe({"method": {"name": name}, "backbone": {"id": path}})
    METHODS.get(name)().apply(backbone, recipe.method)
    return backbone


def flops_per_step(backbone, batch: int, labels: int, text_tokens: int) -> float:
    config = backbone.base_model.config
    image_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    total = trained_path = 0.0
    for tower, tokens in (("vision_model", batch * image_tokens), ("text_model", labels * text_tokens)):
        params = [p for n, p in backbone.named_parameters() if tower in n]
        count = sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1) for p in params)
        total += 2 * count * tokens
        if any(p.requires_grad for p in params):
            trained_path += 4 * count * tokens
    return total + trained_path


def fake_batch(backbone, batch: int, labels: int, device: str):
    size = backbone.base_model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(device)
    targets = torch.randint(0, labels, (batch,), generator=generator).to(device)
    prompts = [f"a photo of a {name}." for name in ["cat", "dog", "car", "ship", "tree", "house", "bird", "fish",
                                                    "star", "apple"][:labels]]
    return pixels, targets, prompts


def hand_loop(backbone, pixels, targets, prompts, steps: int, device: str) -> float:
    model = backbone.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = {k: v.to(device) for k, v in backbone.tokenizer(prompts, padding=True, return_tensors="pt").items()}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            _sync(device)
            start = time.perf_counter()
        with autocast:
            image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
            text = F.normalize(model.get_text_features(**tokens).pooler_output.float(), dim=-1)
            loss = F.cross_entropy(image @ text.t() * 100.0, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return steps * len(pixels) / (time.perf_counter() - start)


def mmpeft_loop(backbone, pixels, targets, prompts, steps: int, device: str) -> float:
    from mmpeft.data import LabelSet
    from mmpeft.objectives import make_objective
    from mmpeft.specs import TrainSpec
    from mmpeft.train import Trainer

    labels = LabelSet([str(i) for i in range(len(prompts))], prompts={str(i): [p] for i, p in enumerate(prompts)})
    objective = make_objective("classification", backbone, labels)
    spec = replace(TrainSpec(), lr=1e-5, max_grad_norm=None, warmup_ratio=0.0,
                   mixed_precision="bf16" if device == "cuda" else "no")
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(backbone, objective, _FixedBatches(len(pixels)), spec, 0, run_dir)
    batch = {"pixel_values": pixels, "labels": targets}
    for step in range(steps + 2):
        if step == 2:
            _sync(device)
            start = time.perf_counter()
        with trainer.accelerator.autocast():
            loss = trainer.loss_module(batch)
        trainer.accelerator.backward(loss)
        trainer.optimizer_step()
    _sync(device)
    return steps * len(pixels) / (time.perf_counter() - start)


class _FixedBatches(torch.utils.data.Dataset):
    """Only its length matters here: the benchmark feeds the same device batch to both loops."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU: checks the script, no figures")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("skipped: no CUDA device (use --smoke to check the script on CPU)")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, steps = (8, 2) if args.smoke else (args.batch, args.steps)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    methods = ["full", "lora"] + (["qlora"] if device == "cuda" else [])
    print(f"device: {name}; torch {torch.__version__}; batch {batch}; {steps} timed steps; 10 labels")
    print("| method | loop | samples/s | peak memory GiB | MFU | vs hand loop |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        path = build_folder(folder + "/clip", args.smoke)
        for method in methods:
            rates = {}
            for loop_name, loop in (("hand", hand_loop), ("mmpeft", mmpeft_loop)):
                backbone = make_backbone(path, method, args.smoke)
                pixels, targets, prompts = fake_batch(backbone, batch, 10, device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                rates[loop_name] = loop(backbone, pixels, targets, prompts, steps, device)
                memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
                flops = flops_per_step(backbone, batch, 10, 8) * rates[loop_name] / batch
                mfu = f"{flops / (peak * 1e12):.1%}" if peak else "n/a"
                ratio = f"{rates[loop_name] / rates['hand']:.3f}" if loop_name == "mmpeft" else ""
                print(f"| {method} | {loop_name} | {rates[loop_name]:.1f} | {memory:.2f} | {mfu} | {ratio} |")
                del backbone
                if device == "cuda":
                    torch.cuda.empty_cache()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
