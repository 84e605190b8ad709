"""`mmpeft-demo/digits-clip`: a tiny CLIP that mmpeft pre-trains itself on real digit scans, built once into the cache.

Why: no machine here reaches a model hub, and a random backbone makes every zero-shot number chance level. So the
demo backbone is made the way a user would make one: `recipes/pretrain-digits.yaml` runs through the ordinary
pipeline (full fine-tuning, contrastive objective, `backbone.init: scratch`) on the pre-training part of
scikit-learn's digits, and the run's saved model folder is copied into the cache. The result is an ordinary
Hugging Face folder: `CLIPModel.from_pretrained` and `AutoProcessor.from_pretrained` load it without mmpeft.

Builds are serialised by a file lock and land by one rename, so concurrent processes (pytest workers, two
notebooks) build once and nobody ever sees a half-written folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmpeft.backbones import DEMO_BACKBONES
from mmpeft.backbones.base import BackboneError
from mmpeft.core.io import PROJECT_ROOT, cache_dir
from mmpeft.tiny.dual_encoder import save_tiny_clip
from mmpeft.tiny.store import tiny_backbone

logger = logging.getLogger("mmpeft")

# Bump when the recipe, the architecture or this builder changes what it writes: cached folders are keyed by it.
BUILD_VERSION = 3  # 3: pre-trained in a subprocess with pinned kernels (PINNED_NUMERICS)
NAME = "mmpeft-demo/digits-clip"
RECIPE = PROJECT_ROOT / "recipes" / "pretrain-digits.yaml"
MARKER = "mmpeft-demo.json"
LOCK_TIMEOUT_S = 900  # how long a second builder waits for the first before giving up

# Every word the caption templates and the ten class names use (a word-level tokenizer: anything else is <unk>).
WORDS = (
    "a an the this of is photo picture image drawing scan handwritten written digit number . , "
    "zero one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9"
)
# The feasibility-tested architecture: 8x8 digits upsampled to 24x24, patch 4, width 64, 267k parameters.
ARCHITECTURE: dict[str, Any] = {
    "image_size": 24,
    "hidden": 64,
    "layers": 3,  # vision layers; the text tower's count is overridden below
    "config_overrides": {
        "vision_config": {"patch_size": 4, "num_attention_heads": 4, "intermediate_size": 256},
        "text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
    },
}


def config_dir() -> Path:
    """The untrained starting point: config, word-level tokenizer and PIL processor (the weights are random).

    `backbone.init: scratch` reads only the config and the processor from it; the weights come from the seed.
    """
    root = cache_dir("demo-backbones")
    target = root / f"digits-clip-config-v{BUILD_VERSION}"
    marker = {"name": f"{NAME}-config", "build_version": BUILD_VERSION}
    if _is_complete(target, marker):
        return target
    with _lock(root, "digits-clip-config"):
        if not _is_complete(target, marker):
            tmp = Path(tempfile.mkdtemp(prefix=".digits-clip-config.", dir=root))
            try:
                save_tiny_clip(tmp / "model", seed=0, words=WORDS, **ARCHITECTURE)
                _install(tmp / "model", target, marker)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_digits_clip() -> Path:
    """The pre-trained demo backbone's folder, pre-training it first (one to two minutes on 2 cores) if not cached."""
    root = cache_dir("demo-backbones")
    target = root / f"digits-clip-v{BUILD_VERSION}"
    marker = {"name": NAME, "build_version": BUILD_VERSION}
    if _is_complete(target, marker):
        return target
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process would build while the others wait at its barriers
        raise BackboneError(f"backbone.id {NAME!r} is not built yet, and a multi-process run cannot build it; "
                            "build it once in a single process first: python -c 'from mmpeft.backbones."
                            "digits_clip import build_digits_clip; build_digits_clip()'")
    with _lock(root, "digits-clip"):
        if _is_complete(target, marker):  # another process built it while this one waited
            return target
        if not RECIPE.is_file():
            raise BackboneError(f"backbone.id {NAME!r}: its pre-training recipe {RECIPE} is missing; it ships with "
                                "the mmpeft source tree (install with `pip install -e .` from a checkout)")
        _pretrain_into(root, target, marker)
    return target


def _pretrain_into(root: Path, target: Path, marker: dict) -> None:
    """Run the pre-training recipe in a temporary folder, then rename its saved model folder onto `target`."""
    from mmpeft.runs.folder import ADAPTER_DIR, METRICS_FILE, RECIPE_FILE
    from mmpeft.runs.single import run

    print(f"building {NAME} once: pre-training a tiny CLIP on 1,078 digit scans with {RECIPE.name} "
          f"(one to two minutes on 2 CPU cores) into {target}", flush=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".digits-clip.", dir=root))
    threads = torch.get_num_threads()
    overrides = {"output.dir": str(tmp / "runs"), "output.name": "pretrain"}
    try:
        # One CPU thread: a 267k-parameter model gains little from more (0.74 vs 1.04 s an epoch on 2 idle cores)
        # but loses up to 10x when the cores are shared, and the weights no longer depend on the machine's core count.
        torch.set_num_threads(1)
        if pinnable():
            metrics = _pretrain_pinned(overrides, tmp / "pretrain-metrics.json")
        else:
            metrics = run(RECIPE, overrides)
        run_dir = tmp / "runs" / "pretrain"
        model = tmp / "model"
        shutil.copytree(run_dir / ADAPTER_DIR, model)
        for name, saved_as in ((METRICS_FILE, "pretrain-metrics.json"), ("report.md", "pretrain-report.md"),
                               (RECIPE_FILE, "pretrain-recipe.yaml")):
            shutil.copy2(run_dir / name, model / saved_as)
        seconds = time.perf_counter() - started
        shifts = metrics["test"].get("shifts", {"none": metrics["test"]})
        marker = {**marker, "seconds": round(seconds, 1),
                  "heldout_accuracy": {name: round(s["accuracy"], 4) for name, s in shifts.items()}}
        _install(model, target, marker)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    accuracy = ", ".join(f"{name} {value:.3f}" for name, value in marker["heldout_accuracy"].items())
    print(f"built {NAME} in {seconds:.0f} s; zero-shot accuracy on held-out digits: {accuracy}", flush=True)


# Kernels chosen by the CPU change the last bits of every sum, and 50 epochs of pre-training turn that into other
# weights: on one thread, this machine's AVX512, AVX2 and default ATen kernels gave three different backbones after
# 2 epochs, and 1 vs 2 threads two more. Pinned to AVX2 kernels (ATen, MKL, oneDNN) on one thread, every x86 CPU
# with AVX2 runs the same arithmetic (same torch build). Set before torch starts, hence a subprocess.
PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pinnable() -> bool:
    """x86 with AVX2 or better: the kernels PINNED_NUMERICS names exist here."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


# The child's terminal is the user's: dependency notices and transformers' "Writing model shards" bar stay out of it
# (as `mmpeft.cli.quiet_dependencies` keeps them out of the parent's).
CHILD_PRELUDE = ("import json, logging, sys; logging.getLogger('bitsandbytes').setLevel(logging.ERROR); "
                 "from transformers.utils import logging as hf_logging; hf_logging.disable_progress_bar(); ")


def _pretrain_pinned(overrides: dict, metrics_file: Path) -> dict:
    """Run the pre-training recipe in a child process started with PINNED_NUMERICS; its metrics come back as JSON."""
    code = (CHILD_PRELUDE + "from mmpeft.runs.single import run; "
            "json.dump(run(sys.argv[1], json.loads(sys.argv[2])), open(sys.argv[3], 'w'))")
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, **PINNED_NUMERICS,
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", code, str(RECIPE), json.dumps(overrides), str(metrics_file)],
                          env=env, check=False)
    if done.returncode != 0:
        raise BackboneError(f"backbone.id {NAME!r}: pre-training it ({RECIPE.name}) failed with exit code "
                            f"{done.returncode}; its output is above")
    return json.loads(metrics_file.read_text())


def _is_complete(path: Path, marker: dict) -> bool:
    """A folder is trusted only if its marker (written last, before the rename) matches this build."""
    try:
        saved = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(key) == value for key, value in marker.items())


def _install(folder: Path, target: Path, marker: dict) -> None:
    """Write the marker into `folder`, then rename it onto `target` (under the lock: no one else is installing)."""
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if target.exists():  # stale (older build) or half-removed: move it aside in one rename, then delete
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, aside / "old")
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, target)


class _lock:
    """An exclusive file lock beside the cached folders (filelock works on every platform)."""

    def __init__(self, root: Path, name: str):
        from filelock import FileLock

        self.path = root / f".{name}.lock"
        self.lock = FileLock(str(self.path), timeout=LOCK_TIMEOUT_S)

    def __enter__(self) -> None:
        from filelock import Timeout

        try:
            self.lock.acquire()
        except Timeout:
            raise BackboneError(f"backbone.id {NAME!r}: another process has been building it for "
                                f"{LOCK_TIMEOUT_S} s (lock {self.path}); remove the lock if that process is gone"
                                ) from None

    def __exit__(self, *exc: object) -> None:
        self.lock.release()

@DEMO_BACKBONES.register("mmpeft-demo/tiny-clip")
def tiny_clip() -> Path:
    """Random weights: zero-shot is chance level. For wiring checks, not for numbers."""
    return tiny_backbone("clip")


@DEMO_BACKBONES.register("mmpeft-demo/tiny-siglip")
def tiny_siglip() -> Path:
    return tiny_backbone("siglip")


@DEMO_BACKBONES.register("mmpeft-demo/tiny-llava")
def tiny_llava() -> Path:
    """A random tiny LLaVA (generative; about 70k parameters): for wiring checks and CPU demos, not for numbers."""
    return tiny_backbone("llava")


@DEMO_BACKBONES.register("mmpeft-demo/tiny-qwen2vl")
def tiny_qwen2vl() -> Path:
    """A random tiny Qwen2-VL (generative; about 90k parameters), saved with the image-only processor."""
    return tiny_backbone("qwen2vl")


def _register_tiny_generative(kind: str) -> None:
    """`mmpeft-demo/tiny-<kind>` for every other tiny generative family (docs/generative-families.md)."""
    DEMO_BACKBONES.register(f"mmpeft-demo/tiny-{kind}")(lambda: tiny_backbone(kind))


for _kind in ("idefics3", "smolvlm", "qwen25vl", "paligemma", "gemma3"):
    _register_tiny_generative(_kind)


@DEMO_BACKBONES.register("mmpeft-demo/digits-clip")
def digits_clip() -> Path:
    """A 267k-parameter CLIP pre-trained by mmpeft on 1,078 real digit scans; built once (about a minute)."""
    return build_digits_clip()


@DEMO_BACKBONES.register("mmpeft-demo/digits-clip-config")
def digits_clip_config() -> Path:
    """digits-clip's architecture, tokenizer and processor with random weights: where its pre-training starts."""
    return config_dir()
