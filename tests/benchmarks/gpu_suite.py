"""GPU suite: one prepared script for one CUDA GPU (target: under 8 minutes) that measures what docs/performance.md
reports, and writes it as markdown + JSON.

    python tests/benchmarks/gpu_suite.py --out gpu-suite-results         # CUDA: the figures (bf16)
    python tests/benchmarks/gpu_suite.py --smoke --out /tmp/gpu-suite    # tiny sizes, CPU without CUDA: checks the code
    python tests/benchmarks/gpu_suite.py --sections methods --methods lora-r8 full   # a subset (to rerun one part)
    python tests/benchmarks/gpu_suite.py --peak-tflops 989.5             # a GPU missing from PEAK_BF16_TFLOPS

Sections (each independent: one that fails records its error and the others still run; results are rewritten after
every section, so a crash keeps what was measured):
- environment: date, command line, GPU, driver, CUDA, library versions, the bf16 peak used for MFU and its source.
- methods: a ViT-B/16-sized CLIP (random weights, bf16, built from config) x every method (full, LoRA r8/r16, DoRA,
  IA3, Houlsby, BitFit, CoOp, VPT, linear probe) at batch 128 and at the largest batch that fits (doubling from 128
  until CUDA runs out of memory): samples/s, FLOPs of one real training step counted by
  torch.utils.flop_counter.FlopCounterMode, MFU against the GPU's bf16 dense peak, peak
  torch.cuda.max_memory_allocated, and `mmpeft.plan`'s peak beside it (target: within 20%).
- quantization: bf16 LoRA vs QLoRA 4-bit and an 8-bit base, `train.optimizer: adamw_8bit`,
  `train.gradient_checkpointing: true` (memory and speed against the bf16 LoRA row).
- input_pipeline: a generated folder of 2,000 224 px JPEGs trained through `mmpeft.run` with the default loader
  settings (and with worker processes) vs the same model stepped on pre-decoded tensors; GPU utilisation sampled
  with torch.cuda.utilization() (needs nvidia-ml-py / pynvml; "n/a" with the reason otherwise).
- generative: a SmolVLM-256M-shaped Idefics3 (random weights, built from a config offline) with LoRA and QLoRA.

A training step is mmpeft's own: the recipe's backbone, method, objective and `Trainer` (accelerate autocast,
gradient clipping, optimizer and scheduler step), stepped on a fixed batch without the DataLoader, so the methods
table measures the model and the input_pipeline section measures the loader. `--smoke` runs the same code on a
tiny CLIP, a few JPEGs and a tiny Idefics3, batch 4, one or two steps each; without CUDA the 4/8-bit rows are
skipped with the reason. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ADAPTERS = REPO / "adapters"
SECTIONS = ("environment", "methods", "quantization", "input_pipeline", "generative")
CLASSES = ["cat", "dog", "bird", "fish", "horse", "deer", "frog", "car", "truck", "ship"]  # all in the tiny vocab
TEMPLATES = ["a photo of a {label}."]
JSON_FILE, MARKDOWN_FILE = "gpu-suite.json", "gpu-suite.md"

# bf16 dense tensor-core peak (without 2:4 sparsity) in TFLOP/s, matched in order against torch.cuda.get_device_name()
# (first hit wins, so longer names come first). From NVIDIA's product datasheets, which quote BF16 "with sparsity":
# the dense figure is half of it. Written from those datasheets without network access here: check the GPU you run
# on, and pass --peak-tflops for one that is missing.
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200 NVL", 835.5, "NVIDIA H200 NVL datasheet: BF16 1,671 TFLOPS with sparsity, halved"),
    ("H200", 989.5, "NVIDIA H200 SXM datasheet: BF16 1,979 TFLOPS with sparsity, halved"),
    ("H100 NVL", 835.5, "NVIDIA H100 NVL datasheet: BF16 1,671 TFLOPS with sparsity, halved"),
    ("H100 PCIe", 756.5, "NVIDIA H100 PCIe datasheet: BF16 1,513 TFLOPS with sparsity, halved"),
    ("H100", 989.5, "NVIDIA H100 SXM datasheet: BF16 1,979 TFLOPS with sparsity, halved"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity)"),
    ("L40S", 362.05, "NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 with sparsity)"),
    ("L4", 121.0, "NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity, halved"),
)

# Method rows: a preset of adapters/ (absolute path, so it resolves from any working directory) plus overrides.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "full": {"preset": "full.yaml"},
    "lora-r8": {"preset": "lora-r8.yaml"},
    "lora-r16": {"preset": "lora-r8.yaml", "r": 16, "alpha": 32},
    "dora-r8": {"preset": "dora-r8.yaml"},
    "ia3": {"preset": "ia3.yaml"},
    "houlsby": {"preset": "houlsby.yaml"},
    "bitfit": {"preset": "bitfit.yaml"},
    "coop-16": {"preset": "coop-16.yaml"},
    "vpt-8": {"preset": "vpt-8.yaml"},
    "linear-probe": {"preset": "linear-probe.yaml"},
}
FROZEN_IMAGE_TOWER = ("coop-16", "linear-probe")  # mmpeft.run caches their image features; here every step encodes

# ViT-B/16 CLIP widths (openai/clip-vit-base-patch16): 224 px in 16 px patches (197 tokens), 12 layers of 768 in the
# image tower, 12 layers of 512 in the text tower, 77 positions, a 49,408-token vocabulary, 512-wide projections.
VIT_B16 = {
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
    "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
                    "max_position_embeddings": 77, "vocab_size": 49408},
    "projection_dim": 512,
}
# SmolVLM-256M's shape (HuggingFaceTB/SmolVLM-256M-Instruct, Idefics3): a SigLIP image tower of 12 x 768 at 512 px in
# 16 px patches, pixel shuffle by 4 (64 image tokens per 512 px image), a SmolLM2-135M-shaped Llama (30 x 576, 9
# heads, 3 key/value heads, MLP 1536, vocabulary 49,280). Written from the public config without network access
# here, so not checked against the file; image splitting is off (one 512 px image, 64 tokens, per example).
SMOLVLM_256M = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 512, "patch_size": 16},
    "text": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "vocab_size": 49280, "max_position_embeddings": 8192,
             "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "rms_norm_eps": 1e-5},
    "scale_factor": 4,
}
TINY_IDEFICS3 = {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512},
    "scale_factor": 2,
}
IDEFICS3_TEMPLATE = (  # SmolVLM's turn format; the answer follows the generation prompt and ends the turn
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}User:{% else %}Assistant:{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Row fields that, when a row was measured and the field is not None, must be finite and > 0 (tests check this).
POSITIVE_KEYS = ("batch", "samples_per_second", "step_seconds", "flops_per_step", "achieved_tflops", "mfu",
                 "peak_bytes", "plan_peak_bytes", "plan_ratio", "trainable_params", "total_params",
                 "speed_vs_reference", "memory_vs_reference", "train_seconds", "wall_seconds", "images",
                 "pipeline_efficiency")


@dataclass(frozen=True)
class Sizes:
    """What differs between the real suite and --smoke: sizes and step counts, never the code path."""

    batch: int  # the fixed batch of every dual-encoder row
    max_batch: int  # the doubling search stops here if memory never runs out
    warmup: int  # untimed steps; the last one runs under FlopCounterMode
    steps: int  # at most this many timed steps ...
    min_steps: int  # ... and at least this many, enough for about `timed_seconds` (from the warm-up steps' time)
    timed_seconds: float
    jpegs: int
    jpeg_classes: int
    loader_epochs: int
    loader_test: float  # test share of the JPEG folder (mmpeft.run needs one; evaluation is outside train time)
    workers: int  # the second loader row's train.num_workers
    generative_batch: int


FULL = Sizes(batch=128, max_batch=8192, warmup=3, steps=10, min_steps=3, timed_seconds=1.5, jpegs=2000,
             jpeg_classes=10, loader_epochs=2, loader_test=0.05, workers=min(8, os.cpu_count() or 1),
             generative_batch=16)
SMOKE = Sizes(batch=4, max_batch=8, warmup=1, steps=1, min_steps=1, timed_seconds=0.0, jpegs=16, jpeg_classes=2,
              loader_epochs=1, loader_test=0.25, workers=1, generative_batch=4)
SHARES = {"methods": 0.5, "quantization": 0.12, "input_pipeline": 0.18, "generative": 0.2}  # of --max-minutes


# --- the mmpeft names the suite needs -------------------------------------------------------------------------------

def mmpeft_internals() -> SimpleNamespace:
    """The non-public mmpeft names a step outside `mmpeft.run` needs: what `mmpeft.run` does between loading a recipe
    and its training loop. Kept in one place, so a package move is one edit here (and in the report)."""
    from mmpeft.data import LabelSet
    from mmpeft.methods import count_parameters
    from mmpeft.objectives import make_objective
    from mmpeft.runs.build import build
    from mmpeft.train import Trainer

    return SimpleNamespace(build=build, LabelSet=LabelSet, count_parameters=count_parameters,
                           make_objective=make_objective, Trainer=Trainer)


def method_recipe(label: str) -> dict[str, Any]:
    """The recipe `method:` mapping of a METHOD_PRESETS row, its preset as an absolute path."""
    entry = dict(METHOD_PRESETS[label])
    entry["preset"] = str(ADAPTERS / entry["preset"])
    return entry


# --- backbones built offline ----------------------------------------------------------------------------------------

def build_clip_folder(folder: str | Path, smoke: bool) -> Path:
    """A CLIP folder with random weights: ViT-B/16-sized, or (smoke) tiny with 77 text positions so CoOp-16 fits."""
    from mmpeft.testing import save_tiny_clip

    if smoke:
        return Path(save_tiny_clip(folder, hidden=64, layers=2,
                                   config_overrides={"text_config": {"max_position_embeddings": 77}}))
    return Path(save_tiny_clip(folder, image_size=224, config_overrides=VIT_B16))


def build_idefics3_folder(folder: str | Path, smoke: bool, seed: int = 0) -> Path:
    """An Idefics3 (SmolVLM) folder with random weights that loads through AutoModelForImageTextToText/AutoProcessor.

    The tokenizer is the byte-level BPE of mmpeft's tiny LLaVA (`mmpeft.testing.tiny_backbone`) plus Idefics3's image
    tokens; the model's vocabulary keeps the real size (ids beyond the tokenizer's are never produced). The image
    processor writes image_seq_len = (image_size / patch_size)^2 / scale_factor^2 tokens per image, which must equal
    what the connector produces.
    """
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    from mmpeft.testing import tiny_backbone

    shape = TINY_IDEFICS3 if smoke else SMOLVLM_256M
    vision, text, scale = shape["vision"], dict(shape["text"]), shape["scale_factor"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone("llava"))
    tokenizer.add_tokens(["<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
                         special_tokens=True)
    size = vision["image_size"]
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": size},
                                                max_image_size={"longest_edge": size}, image_mean=[0.5] * 3,
                                                image_std=[0.5] * 3)
    seq_len = (size // vision["patch_size"]) ** 2 // scale**2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                                  chat_template=IDEFICS3_TEMPLATE)  # adds <image>, <end_of_utterance>, ...
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<pad>", "<s>", "<end_of_utterance>", "<image>")}
    text.setdefault("vocab_size", len(tokenizer))
    if text["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {text['vocab_size']} < the tokenizer's {len(tokenizer)} tokens")
    config = Idefics3Config(vision_config=vision, scale_factor=scale, image_token_id=ids["<image>"],
                            pad_token_id=ids["<pad>"],
                            text_config={"model_type": "llama", **text, "pad_token_id": ids["<pad>"],
                                         "bos_token_id": ids["<s>"], "eos_token_id": ids["<end_of_utterance>"]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config).eval()
    if not smoke:
        model = model.to(torch.bfloat16)  # half the bytes to write and read; runs load it at backbone.dtype anyway
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    out = Path(folder)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def image_size_of(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["vision_config"]["image_size"])


# --- one training step, measured ------------------------------------------------------------------------------------

class LengthOnly(torch.utils.data.Dataset):
    """The Trainer's training set where only its length matters (the scheduler's length); steps get fixed batches."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class StepBench:
    """One recipe's backbone, method, objective and mmpeft Trainer, stepped on a fixed batch.

    The step is the body of `Trainer.run_epoch` without the DataLoader: autocast, the objective's loss, a finite-loss
    check (a host sync, as the loop's), accelerate's backward, `Trainer.optimizer_step` (clipping, optimizer,
    scheduler). Placement follows `mmpeft.run`: a quantized backbone stays where bitsandbytes put it.
    """

    def __init__(self, recipe_data: dict, device: str, run_dir: Path):
        import mmpeft

        mm = mmpeft_internals()
        self.device = device
        self.recipe = mmpeft.load_recipe(recipe_data)
        release_memory()
        self.baseline = torch.cuda.memory_allocated() if device == "cuda" else 0  # left over from earlier rows
        labels = mm.LabelSet.from_spec(self.recipe.data, self.recipe.data.classes)
        backbone = mm.build(self.recipe, labels)  # the one build path: seeded, placed, configured, method applied
        self.params = mm.count_parameters(backbone)
        objective = mm.make_objective(self.recipe.train.objective, backbone, labels)
        self.trainer = mm.Trainer(backbone, objective, LengthOnly(self.recipe.train.batch_size), self.recipe.train,
                                  self.recipe.seed, run_dir)
        self.backbone = backbone
        self.labels = labels
        backbone.train()

    def step(self, batch: dict) -> float:
        trainer = self.trainer
        with trainer.accelerator.autocast():
            loss = trainer.loss_module(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the training loss became {value}")
        trainer.accelerator.backward(loss)
        trainer.optimizer_step()
        return value

    def recover(self) -> None:
        """After CUDA ran out of memory mid-step: drop gradients and cached blocks."""
        self.trainer.optimizer.zero_grad(set_to_none=True)
        release_memory()

    def close(self) -> None:
        self.trainer = self.backbone = None
        release_memory()


def release_memory() -> None:
    """Return CUDA blocks between rows, so one row's cache is not the next row's memory; nothing to do on CPU, where
    nothing is measured (and a full collection costs a smoke run's time)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(bench: StepBench, batch_data: dict, batch: int, sizes: Sizes, count_flops: bool = True) -> dict:
    """samples/s over the timed steps after `sizes.warmup`; FLOPs of the last warm-up step; peak CUDA bytes of the
    timed steps (optimizer state already allocated: the steady state a run spends its time in).

    Timed steps: enough for about `sizes.timed_seconds` judged from the plain warm-up steps, within
    [`sizes.min_steps`, `sizes.steps`], so large batches do not eat the time budget.
    """
    from torch.utils.flop_counter import FlopCounterMode

    flops, plain = None, []
    for index in range(sizes.warmup):
        tic = time.perf_counter()
        if count_flops and index == sizes.warmup - 1:
            counter = FlopCounterMode(display=False)
            with counter:
                bench.step(batch_data)
            flops = int(counter.get_total_flops())
        else:
            bench.step(batch_data)
            synchronize(bench.device)
            plain.append(time.perf_counter() - tic)
    steps = sizes.steps
    if plain and sizes.timed_seconds:
        steps = max(sizes.min_steps, min(sizes.steps, math.ceil(sizes.timed_seconds / min(plain))))
    synchronize(bench.device)
    if bench.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        bench.step(batch_data)
    synchronize(bench.device)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"batch": batch, "samples_per_second": steps * batch / seconds,
                           "step_seconds": seconds / steps, "timed_steps": steps, "flops_per_step": flops}
    if bench.device == "cuda":
        row["peak_bytes"] = int(torch.cuda.max_memory_allocated()) - bench.baseline
    else:
        row["peak_bytes"] = None
        row["peak_note"] = "no CUDA: torch.cuda.max_memory_allocated has nothing to measure"
    return row


def pixel_batch(folder: Path, batch: int, classes: int, device: str) -> dict:
    """Pre-decoded float32 pixels and labels on the device, as the collate function hands them to the loss."""
    size = image_size_of(folder)
    generator = torch.Generator(device=device).manual_seed(batch)
    return {"pixel_values": torch.randn(batch, 3, size, size, device=device, generator=generator),
            "labels": torch.randint(0, classes, (batch,), device=device, generator=generator)}


def with_mfu(row: dict, flops: int | None, peak: tuple[float | None, str]) -> dict:
    """Achieved TFLOP/s and MFU from `flops` (model FLOPs of one step) and the row's step time."""
    if flops:
        row["achieved_tflops"] = flops / row["step_seconds"] / 1e12
        row["mfu"] = row["achieved_tflops"] / peak[0] if peak[0] else None
        if peak[0] is None:
            row["mfu_note"] = peak[1]
    return row


def with_plan(row: dict, recipe_data: dict, batch: int) -> dict:
    """`mmpeft.plan`'s peak (tensors, without its CUDA reserve) for the same recipe and batch, and plan/measured."""
    import mmpeft

    data = json.loads(json.dumps(recipe_data))
    data["train"]["batch_size"] = batch
    try:
        plan = mmpeft.plan(data)[0]
    except Exception as error:  # noqa: BLE001 - a planner refusal is a result, recorded in the row
        row["plan_peak_bytes"] = row["plan_ratio"] = None
        row["plan_note"] = f"mmpeft.plan: {type(error).__name__}: {first_line(error)}"
        return row
    row["plan_peak_bytes"] = int(plan["bytes"]["peak"])
    row["plan_max_batch"] = plan.get("max_batch")
    if plan.get("notes"):
        row["plan_note"] = "; ".join(plan["notes"])
    measured = row.get("peak_bytes")
    row["plan_ratio"] = row["plan_peak_bytes"] / measured if measured else None
    row["plan_within_20pct"] = None if row["plan_ratio"] is None else abs(row["plan_ratio"] - 1) <= 0.2
    return row


def compare_to(row: dict, reference: dict | None) -> None:
    """speed and peak memory relative to a section's reference row (not set on the reference itself)."""
    if reference is None or row is reference:
        return
    row["speed_vs_reference"] = row["samples_per_second"] / reference["samples_per_second"]
    if row.get("peak_bytes") and reference.get("peak_bytes"):
        row["memory_vs_reference"] = row["peak_bytes"] / reference["peak_bytes"]


# --- running sections and rows --------------------------------------------------------------------------------------

@dataclass
class Clock:
    """Each section's share of --max-minutes; a section past its share skips what is left, saying so."""

    total_seconds: float
    started: float = field(default_factory=time.perf_counter)
    section_end: float = math.inf
    section: str = ""

    def begin(self, section: str) -> None:
        self.section = section
        remaining = self.total_seconds - (time.perf_counter() - self.started)
        self.section_end = time.perf_counter() + max(0.0, min(remaining, SHARES.get(section, 1.0) * self.total_seconds))

    def left(self) -> float:
        return self.section_end - time.perf_counter()

    def reason(self) -> str:
        return (f"time budget: the {self.section} section's share ({SHARES.get(self.section, 1.0):.0%} of "
                f"--max-minutes {self.total_seconds / 60:g}) is spent")


@dataclass
class Suite:
    """Settings and shared artefacts of one suite run (the backbone folders are built once, when first needed)."""

    sizes: Sizes
    smoke: bool
    device: str
    tmp: Path
    peak: tuple[float | None, str]
    methods: list[str]
    clock: Clock
    folders: dict[str, Path] = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device == "cuda" else "float32"

    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.device == "cuda" else "no"

    def folder(self, kind: str) -> Path:
        if kind not in self.folders:
            builder = {"clip": build_clip_folder, "idefics3": build_idefics3_folder}[kind]
            tic = time.perf_counter()
            self.folders[kind] = builder(self.tmp / kind, self.smoke)
            log(f"built the {kind} backbone folder in {time.perf_counter() - tic:.1f} s")
        return self.folders[kind]

    def clip_recipe(self, method: dict, batch: int, **train: Any) -> dict:
        return {"name": "gpu-suite", "seed": 0,
                "backbone": {"id": str(self.folder("clip")), "dtype": self.dtype},
                "method": method,
                "data": {"source": "digits", "classes": CLASSES, "templates": TEMPLATES},  # classes: nothing is read
                "train": {"batch_size": batch, "epochs": 1, "lr": 1e-5, "warmup_ratio": 0.0,
                          "mixed_precision": self.mixed_precision, **train},
                "output": {"dir": str(self.tmp / "runs")}}

    def bench(self, recipe_data: dict) -> StepBench:
        return StepBench(recipe_data, self.device, self.tmp / "bench-run")


def log(message: str) -> None:
    print(f"[gpu-suite {datetime.now():%H:%M:%S}] {message}", flush=True)


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def error_fields(error: BaseException) -> dict:
    return {"status": "error", "error": f"{type(error).__name__}: {first_line(error)}",
            "traceback": traceback.format_exc()[-3000:]}


def skipped(label: str, reason: str, **extra: Any) -> dict:
    return {"label": label, "status": "skipped", "reason": reason, **extra}


def clean_numbers(value: Any, problems: list[str], where: str = "") -> Any:
    """JSON-safe: a NaN or infinity becomes None and is listed in `problems` (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{where or 'value'} was {value}")
        return None
    if isinstance(value, dict):
        return {k: clean_numbers(v, problems, k) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_numbers(v, problems, where) for v in value]
    return value


def finish_rows(rows: list[dict]) -> list[dict]:
    """Rows with non-finite numbers turned into errors, so nothing is reported that was not measured."""
    done = []
    for row in rows:
        problems: list[str] = []
        row = clean_numbers(row, problems)
        if problems and row.get("status") == "ok":
            row["status"], row["error"] = "error", "non-finite measurement: " + "; ".join(problems)
        done.append(row)
    return done


def run_section(name: str, suite: Suite, function: Callable[[Suite], dict]) -> dict:
    suite.clock.begin(name)
    tic = time.perf_counter()
    log(f"section {name}")
    try:
        result = function(suite)
        rows = finish_rows(result.get("rows", []))
        status = "partial" if any(r.get("status") == "error" for r in rows) else "ok"
        result = {"status": status, **result, "rows": rows}
    except Exception as error:  # noqa: BLE001 - a failed section is recorded; the others still run
        result = {**error_fields(error), "rows": []}
        log(f"section {name} failed: {result['error']}")
    try:
        release_memory()
    except Exception as error:  # noqa: BLE001 - a broken CUDA context: later sections will record their own errors
        result["cleanup_error"] = f"{type(error).__name__}: {first_line(error)}"
    result["seconds"] = round(time.perf_counter() - tic, 2)
    return result


# --- section: environment -------------------------------------------------------------------------------------------

def peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    """(bf16 dense peak in TFLOP/s or None, where it comes from)."""
    if override:
        return override, f"--peak-tflops {override:g} (given on the command line)"
    if device != "cuda":
        return None, "no CUDA device: MFU is only defined against a GPU's bf16 peak"
    name = torch.cuda.get_device_name()
    for key, value, source in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{source} (matched {key!r} in the GPU name {name!r})"
    return None, f"GPU {name!r} is not in PEAK_BF16_TFLOPS: pass --peak-tflops for MFU"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "mmpeft", "tokenizers", "pillow",
                    "numpy", "nvidia-ml-py", "pynvml"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def driver_version() -> tuple[str | None, str]:
    """(driver version, how it was read): NVML through pynvml, else nvidia-smi."""
    try:
        import pynvml

        pynvml.nvmlInit()
        value = pynvml.nvmlSystemGetDriverVersion()
        return (value.decode() if isinstance(value, bytes) else str(value)), "pynvml"
    except Exception as error:  # noqa: BLE001 - falls back to nvidia-smi
        nvml_error = f"pynvml: {type(error).__name__}: {first_line(error)}"
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
        return done.stdout.strip().splitlines()[0], "nvidia-smi"
    except Exception as error:  # noqa: BLE001
        return None, f"n/a ({nvml_error}; nvidia-smi: {type(error).__name__}: {first_line(error)})"


def section_environment(suite: Suite) -> dict:
    cuda = suite.device == "cuda"
    info: dict[str, Any] = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "mode": "smoke" if suite.smoke else "full",
        "device": suite.device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": versions(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "dtype": suite.dtype,
        "mixed_precision": suite.mixed_precision,
        "peak_bf16_tflops": suite.peak[0],
        "peak_source": suite.peak[1],
        "sizes": dataclasses.asdict(suite.sizes),
        "max_minutes": suite.clock.total_seconds / 60,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": torch.cuda.get_device_name(), "gpu_memory_bytes": int(props.total_memory),
                     "compute_capability": f"{props.major}.{props.minor}", "gpu_count": torch.cuda.device_count()})
        info["driver"], info["driver_source"] = driver_version()
    else:
        info.update({"gpu": None, "driver": None, "driver_source": "no CUDA device"})
    info["gpu_utilisation"] = UtilSampler.availability() or "available (torch.cuda.utilization)"
    return {"info": info}


# --- section: methods -----------------------------------------------------------------------------------------------

def section_methods(suite: Suite) -> dict:
    rows: list[dict] = []
    for label in suite.methods:
        if suite.clock.left() <= 0:
            rows.append(skipped(label, suite.clock.reason()))
            continue
        rows += method_rows(suite, label)
    shape = "tiny CLIP (smoke)" if suite.smoke else "ViT-B/16-sized CLIP"
    sizes = suite.sizes
    timed = f"{sizes.steps}" if sizes.min_steps == sizes.steps else \
        f"{sizes.min_steps}-{sizes.steps} (enough for about {sizes.timed_seconds:g} s)"
    notes = [f"{shape}, random weights, {suite.dtype}, train.mixed_precision {suite.mixed_precision}; "
             f"{len(CLASSES)} classes, so each step also encodes {len(CLASSES)} class prompts with the text tower",
             f"steps: {sizes.warmup} warm-up (the last one counted by FlopCounterMode), {timed} timed",
             "largest batch: doubled from the fixed batch until CUDA ran out of memory (or the search cap); the row "
             "is the last batch that ran",
             "peak: torch.cuda.max_memory_allocated over the timed steps minus what was allocated before the "
             "backbone was built; plan: mmpeft.plan's bytes.peak (no CUDA reserve) for the same recipe and batch",
             f"{', '.join(FROZEN_IMAGE_TOWER)}: the frozen image tower runs every step here; mmpeft.run caches its "
             "features (train.feature_cache: memory), so real epochs are cheaper"]
    return {"rows": rows, "notes": notes}


def method_rows(suite: Suite, label: str) -> list[dict]:
    """The fixed-batch row and the largest-batch row of one method (errors and skips as rows)."""
    recipe = suite.clip_recipe(method_recipe(label), suite.sizes.batch)
    try:
        bench = suite.bench(recipe)
    except Exception as error:  # noqa: BLE001
        log(f"{label}: could not build: {first_line(error)}")
        return [{"label": label, "batch_kind": "fixed", **error_fields(error)}]
    rows = []
    try:
        base = {"label": label, "method": bench.recipe.method.name, "trainable_params": bench.params["trainable"],
                "total_params": bench.params["total"]}
        try:
            fixed = measure(bench, pixel_batch(suite.folder("clip"), suite.sizes.batch, len(CLASSES), suite.device),
                            suite.sizes.batch, suite.sizes)
        except Exception as error:  # noqa: BLE001
            return [{**base, "batch_kind": "fixed", "batch": suite.sizes.batch, **error_fields(error)}]
        rows.append({**base, "status": "ok", "batch_kind": "fixed", **fixed})
        largest, search = search_largest(suite, bench, fixed)
        rows.append({**base, "status": "ok", "batch_kind": "largest", **largest, "search": search})
    finally:
        bench.close()
    for row in rows:
        with_mfu(row, row.get("flops_per_step"), suite.peak)
        with_plan(row, recipe, row["batch"])
        log(f"{label} batch {row['batch']}: {row['samples_per_second']:.1f} samples/s, peak "
            f"{size(row.get('peak_bytes'))}, plan {size(row.get('plan_peak_bytes'))}")
    return rows


def search_largest(suite: Suite, bench: StepBench, fixed: dict) -> tuple[dict, str]:
    """Double the batch until CUDA runs out of memory; the largest batch that ran, and how the search ended."""
    best, batch = fixed, fixed["batch"]
    while True:
        batch *= 2
        if batch > suite.sizes.max_batch:
            return best, f"doubling stopped at the cap {suite.sizes.max_batch} (no out-of-memory)"
        if suite.clock.left() <= 0:
            return best, f"doubling stopped before batch {batch}: {suite.clock.reason()}"
        try:
            best = measure(bench, pixel_batch(suite.folder("clip"), batch, len(CLASSES), suite.device), batch,
                           suite.sizes)
        except Exception as error:  # noqa: BLE001 - out of memory ends the search; anything else too, said so
            why = "CUDA out of memory" if is_out_of_memory(error) else f"{type(error).__name__}: {first_line(error)}"
        else:
            continue
        bench.recover()  # after the except block: the exception's frames (and their activations) are gone
        return best, f"doubling stopped at batch {batch}: {why}"


# --- section: quantization ------------------------------------------------------------------------------------------

REFERENCE = "lora-r8 (reference)"  # at the suite's dtype: bf16 on CUDA
CPU_KBIT = "bitsandbytes {}-bit: its CPU backend is for checking only and gives no figure worth reporting"
QUANT_ROWS: dict[str, tuple[dict, dict, str]] = {  # label -> (backbone additions, train additions, what needs CUDA)
    REFERENCE: ({}, {}, ""),
    "qlora 4-bit": ({"quantization": {"bits": 4, "compute_dtype": "bfloat16"}}, {}, CPU_KBIT.format(4)),
    "lora-r8 8-bit base": ({"quantization": {"bits": 8}}, {}, CPU_KBIT.format(8)),
    "lora-r8 adamw_8bit": ({}, {"optimizer": "adamw_8bit"},
                           "train.optimizer adamw_8bit is bitsandbytes' CUDA optimizer (mmpeft refuses it on CPU)"),
    "lora-r8 gradient checkpointing": ({}, {"gradient_checkpointing": True}, ""),
}


def section_quantization(suite: Suite) -> dict:
    rows: list[dict] = []
    reference: dict | None = None
    for label, (backbone, train, needs_cuda) in QUANT_ROWS.items():
        if needs_cuda and suite.device != "cuda":
            rows.append(skipped(label, f"needs CUDA: {needs_cuda}"))
            continue
        if suite.clock.left() <= 0:
            rows.append(skipped(label, suite.clock.reason()))
            continue
        recipe = suite.clip_recipe(method_recipe("lora-r8"), suite.sizes.batch, **train)
        recipe["backbone"].update(backbone)
        row = quant_row(suite, label, recipe)
        if label == REFERENCE and row["status"] == "ok":
            reference = row
        rows.append(row)
    # Model FLOPs are the bf16 LoRA step's: bitsandbytes' kernels are invisible to FlopCounterMode and
    # checkpointing's recomputation is hardware work, not model work (counting it would give HFU, not MFU).
    model_flops = reference.get("flops_per_step") if reference else None
    for row in rows:
        if row["status"] != "ok":
            continue
        row["counted_flops_per_step"] = row.pop("flops_per_step", None)
        row["flops_per_step"] = model_flops
        row["flops_source"] = "the reference row's count (model FLOPs)" if model_flops else "n/a: no reference row"
        with_mfu(row, model_flops, suite.peak)
        compare_to(row, reference)
    notes = [f"batch {suite.sizes.batch}; LoRA r8 on both towers, {suite.dtype}; vs LoRA: against the reference row",
             "4-bit: nf4 with double quantization, bf16 compute; 8-bit: LLM.int8 (bitsandbytes defaults)",
             "MFU of every row uses the reference row's FlopCounterMode count (model FLOPs); the row's own count is "
             "counted_flops_per_step"]
    return {"rows": rows, "notes": notes}


def quant_row(suite: Suite, label: str, recipe: dict) -> dict:
    try:
        bench = suite.bench(recipe)
    except Exception as error:  # noqa: BLE001
        return {"label": label, **error_fields(error)}
    try:
        data = pixel_batch(suite.folder("clip"), suite.sizes.batch, len(CLASSES), suite.device)
        row = {"label": label, "status": "ok", "trainable_params": bench.params["trainable"],
               "total_params": bench.params["total"], **measure(bench, data, suite.sizes.batch, suite.sizes)}
    except Exception as error:  # noqa: BLE001
        return {"label": label, "batch": suite.sizes.batch, **error_fields(error)}
    finally:
        bench.close()
    with_plan(row, recipe, suite.sizes.batch)
    log(f"{label}: {row['samples_per_second']:.1f} samples/s, peak {size(row.get('peak_bytes'))}")
    return row


# --- section: input pipeline ----------------------------------------------------------------------------------------

class UtilSampler:
    """torch.cuda.utilization() (NVML: the share of the last sample period in which a kernel ran) on a thread."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.reason = self.availability()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def availability() -> str | None:
        """None when sampling works here, else why it does not."""
        if not torch.cuda.is_available():
            return "n/a: no CUDA device"
        try:
            torch.cuda.utilization()
        except Exception as error:  # noqa: BLE001 - typically nvidia-ml-py (pynvml) not installed
            return f"n/a: torch.cuda.utilization() failed: {type(error).__name__}: {first_line(error)}"
        return None

    def __enter__(self) -> UtilSampler:
        if self.reason is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), int(torch.cuda.utilization())))
            except Exception as error:  # noqa: BLE001
                self.reason = f"n/a: sampling failed: {type(error).__name__}: {first_line(error)}"
                return
            self._stop.wait(self.interval)

    def mean(self, start: float | None = None, end: float | None = None) -> float | None:
        chosen = [u for t, u in self.samples if (start is None or t >= start) and (end is None or t <= end)]
        return sum(chosen) / len(chosen) if chosen else None


def write_jpeg_folder(root: Path, count: int, classes: int, size: int = 224, seed: int = 0) -> Path:
    """`count` JPEGs of size x size in `classes` sub-folders: smooth random colour fields plus noise (about the
    entropy of a photo; real photographs are larger and decode somewhat slower)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(count):
        folder = root / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (size, size, 3)).astype(np.int16)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)
    return root


def training_window(run_dir: Path) -> tuple[float, float] | None:
    """(start, end) of training from the run's train.log: the line naming the method, applied just before training,
    to the last epoch line. None if the log does not say (then the whole mmpeft.run call is used)."""
    try:
        lines = (run_dir / "train.log").read_text().splitlines()
    except OSError:
        return None
    stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (.*)$")
    start = end = None
    for line in lines:
        found = stamp.match(line)
        if not found:
            continue
        when = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if found.group(2).startswith("method ") and start is None:
            start = when
        elif re.match(r"epoch \d+:", found.group(2)):
            end = when
    return (start, end) if start is not None and end is not None and end > start else None


def section_input_pipeline(suite: Suite) -> dict:
    import mmpeft

    sizes = suite.sizes
    jpegs = write_jpeg_folder(suite.tmp / "jpegs", sizes.jpegs, sizes.jpeg_classes)
    clip = suite.folder("clip")
    classes = sorted(p.name for p in jpegs.iterdir() if p.is_dir())
    rows: list[dict] = []
    for label, workers in (("folder JPEGs, mmpeft.run, default loader", None),
                           (f"folder JPEGs, mmpeft.run, train.num_workers {sizes.workers}", sizes.workers)):
        if suite.clock.left() <= 0:
            rows.append(skipped(label, suite.clock.reason()))
            continue
        name = f"loader-{workers or 'default'}"
        recipe = {"name": name, "seed": 0, "backbone": {"id": str(clip), "dtype": suite.dtype},
                  "method": method_recipe("lora-r8"),
                  "data": {"source": "folder", "path": str(jpegs), "templates": TEMPLATES,
                           "split": {"val": 0.0, "test": sizes.loader_test}},
                  "train": {"batch_size": sizes.batch, "epochs": sizes.loader_epochs, "lr": 1e-5,
                            "warmup_ratio": 0.0, "mixed_precision": suite.mixed_precision},
                  "eval": {"zero_shot": False},
                  "output": {"dir": str(suite.tmp / "runs"), "name": name}}
        if workers is not None:
            recipe["train"]["num_workers"] = workers
        try:
            release_memory()
            tic, wall = time.time(), time.perf_counter()
            with UtilSampler() as sampler:
                metrics = mmpeft.run(recipe)
            wall = time.perf_counter() - wall
            run_dir = Path(recipe["output"]["dir"]) / name
            ran = mmpeft.load_recipe(run_dir / "recipe.yaml")
            window = training_window(run_dir)
            train = metrics["train"]
            row = {"label": label, "status": "ok", "batch": sizes.batch, "num_workers": ran.train.num_workers,
                   "images": metrics["data"]["counts"]["train"], "epochs": train["epochs_run"],
                   "samples_per_second": train["samples_per_second"], "train_seconds": train["seconds"],
                   "wall_seconds": wall}
            source = "the training window read from train.log" if window else "the whole mmpeft.run call"
            window = window or (tic, time.time())
            row.update(utilisation(sampler, window, source))
            row["utilisation_window"] = {"source": source, "seconds": window[1] - window[0]}
        except Exception as error:  # noqa: BLE001
            row = {"label": label, **error_fields(error)}
        rows.append(row)
        log(f"{label}: {row.get('samples_per_second', float('nan')):.1f} samples/s")
    label = "pre-decoded tensors on the device, same model and step"
    if suite.clock.left() <= 0:
        rows.append(skipped(label, suite.clock.reason()))
    else:
        rows.append(predecoded_row(suite, label, classes))
    reference = rows[-1] if rows[-1]["status"] == "ok" else None
    for row in rows[:-1]:
        if reference and row["status"] == "ok":
            row["pipeline_efficiency"] = row["samples_per_second"] / reference["samples_per_second"]
    notes = [f"{sizes.jpegs} JPEGs of 224 px in {sizes.jpeg_classes} class folders; LoRA r8, batch {sizes.batch}, "
             f"epochs: {sizes.loader_epochs}, zero-shot evaluation off; samples/s is mmpeft.run's own "
             "(metrics train.samples_per_second: samples over the training loop's seconds, first steps included)",
             "pipeline_efficiency: loader samples/s over the pre-decoded samples/s (1.0: the loader costs nothing)",
             "GPU utilisation: mean of torch.cuda.utilization() sampled every 0.1 s"]
    return {"rows": rows, "notes": notes}


def utilisation(sampler: UtilSampler, window: tuple[float, float], source: str) -> dict:
    value = sampler.mean(*window)
    if value is None:
        return {"gpu_utilisation": None, "gpu_utilisation_note": sampler.reason or "n/a: no samples in the window"}
    return {"gpu_utilisation": value / 100.0, "gpu_utilisation_note": f"{len(sampler.samples)} samples; {source}"}


def predecoded_row(suite: Suite, label: str, classes: list[str]) -> dict:
    recipe = suite.clip_recipe(method_recipe("lora-r8"), suite.sizes.batch)
    recipe["data"]["classes"] = classes
    try:
        bench = suite.bench(recipe)
    except Exception as error:  # noqa: BLE001
        return {"label": label, **error_fields(error)}
    try:
        data = pixel_batch(suite.folder("clip"), suite.sizes.batch, len(classes), suite.device)
        tic = time.time()
        with UtilSampler() as sampler:
            row = measure(bench, data, suite.sizes.batch, suite.sizes, count_flops=False)
        row = {"label": label, "status": "ok", **row, **utilisation(sampler, (tic, time.time()),
                                                                      "warm-up and timed steps")}
    except Exception as error:  # noqa: BLE001
        row = {"label": label, **error_fields(error)}
    finally:
        bench.close()
    return row


# --- section: generative --------------------------------------------------------------------------------------------

def section_generative(suite: Suite) -> dict:
    folder = suite.folder("idefics3")
    rows: list[dict] = []
    reference: dict | None = None
    for label, quantization in (("lora r8 (language model)", None),
                                ("qlora 4-bit (language model)", {"bits": 4, "compute_dtype": "bfloat16"})):
        if quantization and suite.device != "cuda":
            rows.append(skipped(label, "needs CUDA: bitsandbytes 4-bit on CPU is for checking only"))
            continue
        if suite.clock.left() <= 0:
            rows.append(skipped(label, suite.clock.reason()))
            continue
        recipe = {"name": "gpu-suite-generative", "seed": 0,
                  "backbone": {"id": str(folder), "dtype": suite.dtype, "quantization": quantization},
                  "method": {"name": "lora", "r": 8, "alpha": 16},
                  "data": {"source": "digits", "classes": CLASSES, "question": "What is in the image?"},
                  "train": {"objective": "generative", "batch_size": suite.sizes.generative_batch, "epochs": 1,
                            "lr": 1e-5, "warmup_ratio": 0.0, "mixed_precision": suite.mixed_precision},
                  "output": {"dir": str(suite.tmp / "runs")}}
        row = generative_row(suite, label, recipe, count_flops=quantization is None)
        if quantization is None and row["status"] == "ok":
            reference = row
        rows.append(row)
    model_flops = reference.get("flops_per_step") if reference else None
    for row in rows:
        if row["status"] == "ok":
            row["flops_per_step"] = model_flops
            with_mfu(row, model_flops, suite.peak)
            compare_to(row, reference)
    shape = "tiny Idefics3 (smoke)" if suite.smoke else "SmolVLM-256M-shaped Idefics3"
    vocabulary = "the tokenizer's" if suite.smoke else "the real size, 49,280"
    notes = [f"{shape}, random weights, built from a config offline (tokenizer: mmpeft's tiny BPE plus Idefics3's "
             f"image tokens; vocabulary: {vocabulary}); image splitting off: one image per example",
             f"batch {suite.sizes.generative_batch}; train.objective generative (answer-token loss); the step includes "
             "the processor (prompt rendering, image resizing) as mmpeft's generative objective encodes in the step",
             "MFU from the LoRA row's FlopCounterMode count (model FLOPs); plan/measured: mmpeft plan's generative "
             "plan"]
    return {"rows": rows, "notes": notes}


def generative_row(suite: Suite, label: str, recipe: dict, count_flops: bool) -> dict:
    from PIL import Image

    try:
        bench = suite.bench(recipe)
    except Exception as error:  # noqa: BLE001
        return {"label": label, **error_fields(error)}
    batch = suite.sizes.generative_batch
    try:
        generator = torch.Generator().manual_seed(0)
        coarse = torch.randint(0, 256, (batch, 7, 7, 3), generator=generator, dtype=torch.uint8).numpy()
        images = [Image.fromarray(c).resize((224, 224), Image.BICUBIC) for c in coarse]
        data = {"pixel_values": images, "labels": torch.randint(0, len(CLASSES), (batch,), generator=generator)}
        tic = time.perf_counter()
        encoded = bench.trainer.objective.inputs(data)
        encode_seconds = time.perf_counter() - tic
        row = {"label": label, "status": "ok", "trainable_params": bench.params["trainable"],
               "total_params": bench.params["total"], "sequence_length": int(encoded["input_ids"].shape[1]),
               "encode_seconds": encode_seconds,
               **measure(bench, data, batch, suite.sizes, count_flops=count_flops)}
    except Exception as error:  # noqa: BLE001
        row = {"label": label, "batch": batch, **error_fields(error)}
    finally:
        bench.close()
    if row["status"] == "ok":
        with_plan(row, recipe, batch)
        log(f"{label}: {row['samples_per_second']:.1f} samples/s, peak {size(row.get('peak_bytes'))}")
    return row


# --- output ---------------------------------------------------------------------------------------------------------

def size(value: float | None) -> str:
    """Bytes as GiB, or MiB below one GiB (the smoke run's tiny models)."""
    if value is None:
        return "n/a"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def number(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def cell(row: dict, key: str, render: Callable[[Any], str]) -> str:
    return render(row.get(key)) if row.get("status") == "ok" else ""


def status_note(row: dict) -> str:
    if row.get("status") == "skipped":
        return f"skipped: {row['reason']}"
    if row.get("status") == "error":
        return f"error: {row['error']}"
    return ""


def markdown(results: dict) -> str:
    """The results as markdown: environment, then one table per section, its notes and its errors."""
    lines = ["# mmpeft GPU suite", ""]
    env = results["sections"].get("environment", {})
    info = env.get("info", {})
    if info:
        versions_text = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v != "not installed")
        lines += ["| | |", "|---|---|",
                  f"| date | {info['date']} |", f"| command | `{info['command']}` |",
                  f"| mode | {info['mode']} ({info['device']}, {info['dtype']}, mixed precision "
                  f"{info['mixed_precision']}) |",
                  f"| GPU | {info.get('gpu') or 'none'} |",
                  f"| driver | {info.get('driver') or 'n/a'} ({info.get('driver_source')}) |",
                  f"| CUDA (torch build) | {info.get('torch_cuda') or 'n/a'} |",
                  f"| bf16 peak for MFU | {number(info.get('peak_bf16_tflops'))} TFLOP/s: {info['peak_source']} |",
                  f"| GPU utilisation | {info['gpu_utilisation']} |",
                  f"| versions | {versions_text} |", ""]
    for name in SECTIONS[1:]:
        section = results["sections"].get(name)
        if section is None:
            continue
        lines += [f"## {name}", "", f"status: {section['status']}, {section.get('seconds', 0):.0f} s", ""]
        if section.get("reason"):
            lines += [f"{section['reason']}", ""]
        if section.get("error"):
            lines += [f"error: `{section['error']}`", ""]
        rows = section.get("rows", [])
        if rows:
            lines += TABLES[name](rows) + [""]
        lines += [f"- {note}" for note in section.get("notes", [])]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def methods_table(rows: list[dict]) -> list[str]:
    lines = ["| method | batch | samples/s | step ms | TFLOP/step | TFLOP/s | MFU | peak memory | plan | plan/measured "
             "| trainable | notes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        notes = status_note(row) or row.get("search", "") if row.get("batch_kind") == "largest" else status_note(row)
        batch = f"{row.get('batch', '')}" + (" (largest)" if row.get("batch_kind") == "largest" else "")
        lines.append(f"| {row['label']} | {batch} | {cell(row, 'samples_per_second', number)} | "
                     f"{cell(row, 'step_seconds', lambda v: number(v * 1e3 if v else None))} | "
                     f"{cell(row, 'flops_per_step', lambda v: number(v / 1e12 if v else None, '.3g'))} | "
                     f"{cell(row, 'achieved_tflops', lambda v: number(v, '.3g'))} | {cell(row, 'mfu', percent)} | "
                     f"{cell(row, 'peak_bytes', size)} | {cell(row, 'plan_peak_bytes', size)} | "
                     f"{cell(row, 'plan_ratio', lambda v: number(v, '.2f'))} | "
                     f"{cell(row, 'trainable_params', lambda v: f'{v:,}' if v else 'n/a')} | {notes} |")
    return lines


def quantization_table(rows: list[dict]) -> list[str]:
    lines = ["| setting | batch | samples/s | speed vs LoRA | peak memory | memory vs LoRA | MFU | plan | "
             "plan/measured | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row.get('batch', '')} | {cell(row, 'samples_per_second', number)} | "
                     f"{cell(row, 'speed_vs_reference', lambda v: number(v, '.2f'))} | "
                     f"{cell(row, 'peak_bytes', size)} | {cell(row, 'memory_vs_reference', lambda v: number(v, '.2f'))}"
                     f" | {cell(row, 'mfu', percent)} | {cell(row, 'plan_peak_bytes', size)} | "
                     f"{cell(row, 'plan_ratio', lambda v: number(v, '.2f'))} | {status_note(row)} |")
    return lines


def input_table(rows: list[dict]) -> list[str]:
    lines = ["| input | batch | samples/s | vs pre-decoded | GPU utilisation | train s | notes |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        note = status_note(row) or row.get("gpu_utilisation_note", "")
        lines.append(f"| {row['label']} | {row.get('batch', '')} | {cell(row, 'samples_per_second', number)} | "
                     f"{cell(row, 'pipeline_efficiency', lambda v: number(v, '.2f'))} | "
                     f"{cell(row, 'gpu_utilisation', percent)} | {cell(row, 'train_seconds', number)} | {note} |")
    return lines


def generative_table(rows: list[dict]) -> list[str]:
    lines = ["| method | batch | tokens/example | samples/s | MFU | peak memory | memory vs LoRA | trainable | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        note = status_note(row) or row.get("plan_note", "")
        lines.append(f"| {row['label']} | {row.get('batch', '')} | {cell(row, 'sequence_length', str)} | "
                     f"{cell(row, 'samples_per_second', number)} | {cell(row, 'mfu', percent)} | "
                     f"{cell(row, 'peak_bytes', size)} | {cell(row, 'memory_vs_reference', lambda v: number(v, '.2f'))}"
                     f" | {cell(row, 'trainable_params', lambda v: f'{v:,}' if v else 'n/a')} | {note} |")
    return lines


TABLES: dict[str, Callable[[list[dict]], list[str]]] = {
    "methods": methods_table, "quantization": quantization_table, "input_pipeline": input_table,
    "generative": generative_table,
}


def write_results(out: Path, results: dict) -> None:
    """JSON (strict: no NaN) and markdown, each written beside and renamed, so a reader never sees half a file."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in ((JSON_FILE, json.dumps(results, indent=2, allow_nan=False) + "\n"),
                       (MARKDOWN_FILE, markdown(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


# --- main -----------------------------------------------------------------------------------------------------------

def quiet() -> None:
    """Dependency notices (progress bars, deprecations, optional bitsandbytes kernels) are not results."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def default_out() -> Path:
    out = Path(f"gpu-suite-{datetime.now():%Y-%m-%d}")
    return out if not (out / JSON_FILE).exists() else Path(f"{out}-{datetime.now():%H%M%S}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: gpu-suite-<date>/)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one or two steps each: checks the code")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS[1:], default=list(SECTIONS[1:]))
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_PRESETS), default=list(METHOD_PRESETS))
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (overrides the table)")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="time budget, shared out between sections")
    parser.add_argument("--batch", type=int, default=None, help="fixed batch (default: 128, smoke 4)")
    parser.add_argument("--steps", type=int, default=None, help="most timed steps per measurement (default 10)")
    parser.add_argument("--tmp", type=Path, default=None, help="where backbone folders and JPEGs are written")
    return parser.parse_args(argv)


@contextmanager
def scratch(root: Path | None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gpu-suite-", dir=root) as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device == "cpu" and not args.smoke:
        print("no CUDA device: the suite's figures need a GPU; run with --smoke to check the code on CPU",
              file=sys.stderr)
        return 2
    quiet()
    if device == "cpu":
        torch.set_num_threads(1)  # tiny smoke models: one thread beats two fighting (and other jobs) for the cores
    sizes = SMOKE if args.smoke else FULL
    if args.batch:
        sizes = dataclasses.replace(sizes, batch=args.batch)
    if args.steps:
        sizes = dataclasses.replace(sizes, steps=args.steps, min_steps=min(sizes.min_steps, args.steps))
    out = args.out or default_out()
    functions = {"environment": section_environment, "methods": section_methods,
                 "quantization": section_quantization, "input_pipeline": section_input_pipeline,
                 "generative": section_generative}
    started = time.perf_counter()
    results: dict[str, Any] = {"suite": "mmpeft gpu suite", "complete": False, "sections": {}}
    with scratch(args.tmp) as tmp:
        suite = Suite(sizes=sizes, smoke=args.smoke, device=device, tmp=tmp,
                      peak=peak_tflops(device, args.peak_tflops), methods=list(args.methods),
                      clock=Clock(args.max_minutes * 60))
        for name in SECTIONS:
            if name != "environment" and name not in args.sections:
                results["sections"][name] = {"status": "skipped", "reason": "not selected (--sections)", "rows": []}
                continue
            results["sections"][name] = run_section(name, suite, functions[name])
            results["seconds"] = round(time.perf_counter() - started, 2)
            write_results(out, results)
        results["complete"] = True  # false in a file left by a crash: the sections after the last one are missing
        write_results(out, results)
    log(f"done in {time.perf_counter() - started:.1f} s: {out / MARKDOWN_FILE}, {out / JSON_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
