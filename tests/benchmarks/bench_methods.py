"""Method benchmark: trainable share, training-step memory and step time of every method, relative to full
fine-tuning in the same run, plus the weight footprint of fp32 vs 8-bit vs 4-bit loading.

    python tests/benchmarks/bench_methods.py                 # ~25M-parameter CLIP built from config, CPU
    python tests/benchmarks/bench_methods.py --batch 4 --steps 2

The backbone is a CLIP with random weights built from a config (no download): 8 + 8 layers of width 384,
224 px images in 32 px patches, 77 text positions. Each method runs in its own subprocess, so one method's
allocations cannot hide in another's high-water mark.

Memory: torch's CPU allocator has no peak counter and tracemalloc does not see its allocations, so the step's
peak is read from the kernel: the process's resident high-water mark (VmHWM) is reset through
/proc/self/clear_refs just before the first training step and read after the last; "step peak" is that mark
minus the resident size before the step (gradients + optimizer state + activations + workspace). Where
clear_refs is unavailable it falls back to ru_maxrss deltas, which can only under-report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {  # row -> method preset (adapters/) or mapping; all measured on the same backbone and batch
    "full": "adapters/full.yaml",
    "lora r8": "adapters/lora-r8.yaml",
    "dora r8": "adapters/dora-r8.yaml",
    "rslora r8": "adapters/rslora-r8.yaml",
    "ia3": "adapters/ia3.yaml",
    "houlsby": "adapters/houlsby.yaml",
    "pfeiffer": "adapters/pfeiffer.yaml",
    "bitfit": "adapters/bitfit.yaml",
    "coop 16": "adapters/coop-16.yaml",
    "vpt 8": "adapters/vpt-8.yaml",
    "linear probe": "adapters/linear-probe.yaml",
    "qlora r8 (4-bit)": "adapters/lora-r8.yaml",
}
QUANTIZED = {"qlora r8 (4-bit)": 4}
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ROOT = Path(__file__).resolve().parents[2]


def build_backbone(out: Path) -> Path:
    """A ~25M-parameter CLIP with random weights and the local word tokenizer, saved as a normal HF folder."""
    from mmpeft.testing import save_tiny_clip

    sizes = {"intermediate_size": 1536, "num_attention_heads": 6}
    return save_tiny_clip(out, image_size=224, hidden=384, layers=8, config_overrides={
        "vision_config": {**sizes, "patch_size": 32}, "text_config": {**sizes, "max_position_embeddings": 77}})


def resident() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_one(folder: str, row: str, batch_size: int, steps: int) -> dict:
    """In a fresh process: load, apply the method, run 1 + `steps` training steps on a fixed batch."""
    import torch

    from mmpeft.backbones import load_backbone
    from mmpeft.data import LabelSet
    from mmpeft.methods import METHODS as REGISTRY
    from mmpeft.methods import count_parameters
    from mmpeft.objectives import Classification
    from mmpeft.runs.recipe import load_recipe
    from mmpeft.specs import BackboneSpec, QuantizationSpec

    torch.manual_seed(0)
    labels = LabelSet(CLASSES)
    config = load_recipe({"method": str(ROOT / METHODS[row])}).method
    bits = QUANTIZED.get(row)
    backbone = load_backbone(BackboneSpec(id=folder, quantization=QuantizationSpec(bits=bits) if bits else None))
    REGISTRY.get(config.name)().apply(backbone, config, labels)
    params = count_parameters(backbone)
    batch = {"pixel_values": torch.randn(batch_size, 3, 224, 224), "labels": torch.arange(batch_size) % len(CLASSES)}
    objective = Classification(backbone, labels)
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-4)
    backbone.train()

    def step() -> float:
        tic = time.perf_counter()
        loss = objective.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - tic

    before = resident()["VmRSS"]
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    exact = reset_peak()
    times = [step() for _ in range(1 + steps)]  # the first step also allocates gradients and optimizer state
    peak = resident()["VmHWM"] if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step_peak = peak - (before if exact else maxrss_before)
    return {"row": row, "trainable": params["trainable"], "total": params["total"], "percent": params["percent"],
            "step_seconds": statistics.median(times[1:]), "step_peak_bytes": step_peak,
            "memory_source": "VmHWM reset via clear_refs" if exact else "ru_maxrss delta"}


def footprints(folder: str) -> dict[str, dict[str, int]]:
    from mmpeft.backbones import load_backbone
    from mmpeft.backbones.quantization import weight_bytes
    from mmpeft.specs import BackboneSpec, QuantizationSpec

    result = {}
    for label, bits in (("fp32", None), ("8-bit", 8), ("4-bit nf4", 4)):
        backbone = load_backbone(BackboneSpec(id=folder, quantization=QuantizationSpec(bits=bits) if bits else None))
        result[label] = {"all": weight_bytes(backbone), "linear": weight_bytes(backbone, linear_only=True)}
        del backbone
    return result


def run_child(folder: str, row: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", row, "--folder", folder, "--batch", str(args.batch),
               "--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{row}: the measuring process failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def mb(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def report(results: list[dict], prints: dict, args: argparse.Namespace) -> str:
    full = next(r for r in results if r["row"] == "full")
    lines = [f"backbone: CLIP from config, {full['total'] / 1e6:.1f}M parameters, random weights; batch {args.batch}, "
             f"224 px, {len(CLASSES)} classes; CPU, {args.threads} thread(s); step time = median of {args.steps} "
             f"steps after one warm-up step; memory: {full['memory_source']}",
             "",
             "| method | trainable | % of total | step s | x full | step peak MB | x full |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['row']} | {r['trainable']:,} | {r['percent']:.3f} | {r['step_seconds']:.2f} | "
                     f"{r['step_seconds'] / full['step_seconds']:.2f} | {mb(r['step_peak_bytes'])} | "
                     f"{r['step_peak_bytes'] / full['step_peak_bytes']:.2f} |")
    base = prints["fp32"]
    lines += ["", "| loading | weights MB | x fp32 | linear weights MB | x fp32 (linear) |",
              "|---|---:|---:|---:|---:|"]
    for label, sizes in prints.items():
        lines.append(f"| {label} | {mb(sizes['all'])} | {sizes['all'] / base['all']:.3f} | {mb(sizes['linear'])} | "
                     f"{sizes['linear'] / base['linear']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    parser.add_argument("--only", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_one(args.folder, args.child, args.batch, args.steps)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(build_backbone(Path(tmp) / "clip-25m"))
        rows = ["full", *[r for r in (args.only or METHODS) if r != "full"]]
        results = []
        for row in rows:
            results.append(run_child(folder, row, args))
            print(f"  {row}: {results[-1]['step_seconds']:.2f} s/step", file=sys.stderr, flush=True)
        print(report(results, footprints(folder), args))


if __name__ == "__main__":
    main()
