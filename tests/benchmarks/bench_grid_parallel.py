"""Grid executors on CPU-bound cells: sequential (1 torch thread) against 2 workers of 1 thread (processes, Ray).

    python tests/benchmarks/bench_grid_parallel.py [--seeds 4] [--epochs 150] [--executors processes ray] [--smoke]

The same compare grid (LoRA on the text tower and LoRA on the image tower x `--seeds` seeds = 2 x seeds cells, 8 by
default, on the demo-free tiny random CLIP and a generated colour folder, no feature cache so every epoch computes)
runs once per executor, each in its own grid folder. Prints each executor's wall time, its speedup over sequential,
its fixed cost (wall time minus sequential / 2: starting the workers, each importing torch, transformers and peft,
and for Ray starting a local Ray with 2 CPUs) and whether every cell's test metrics and validation history equal the
sequential run's. The default 150 epochs make a cell about 15-20 s on 2 cores, so the fixed cost is small next to
the cells, as in real grids (cells of minutes); `--epochs 30` shows how a grid of 3-second cells fares.
`--smoke` makes it tiny (2 seeds, 1 epoch: 4 cells) to check that it runs, not to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

import mmpeft  # noqa: E402
from mmpeft.testing import tiny_backbone  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import write_color_folder  # noqa: E402

METHODS = [{"name": "lora", "r": 4, "alpha": 8, "towers": ["text"], "label": "lora-text"},
           {"name": "lora", "r": 4, "alpha": 8, "towers": ["vision"], "label": "lora-vision"}]


def recipe(folder: Path, out: Path, executor: str, seeds: int, epochs: int) -> dict:
    return {"name": "bench-grid-parallel", "seed": 0, "backbone": {"id": str(tiny_backbone("clip"))},
            "data": {"source": "folder", "path": str(folder), "templates": ["a photo of a {label} image."],
                     "split": {"val": 0.25, "test": 0.25}},
            "train": {"epochs": epochs, "batch_size": 8, "lr": 0.02, "warmup_ratio": 0.0,
                      "feature_cache": "recompute"},
            "eval": {"batch_size": 32, "zero_shot": False}, "output": {"dir": str(out), "name": executor},
            "grid": {"methods": METHODS, "seeds": list(range(seeds)), "executor": executor, "max_parallel": 2,
                     "threads_per_cell": 1, "cpus_per_cell": 1}}


def numbers(grid: Path) -> dict:
    """Per cell: test metrics and validation history, what must not depend on the executor."""
    found = {}
    for path in sorted((grid / "cells").glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        history = [{k: v for k, v in h.items() if k.startswith("val_")} for h in metrics["train"]["history"]]
        found[path.parent.name] = {"test": {k: metrics["test"][k] for k in ("accuracy", "macro_f1", "per_class")},
                                   "history": history}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--executors", nargs="+", default=["processes", "ray"], choices=["processes", "ray"])
    parser.add_argument("--smoke", action="store_true", help="2 seeds x 1 epoch: proves it runs, measures nothing")
    args = parser.parse_args()
    seeds, epochs = (2, 1) if args.smoke else (args.seeds, args.epochs)
    torch.set_num_threads(1)  # the sequential side: one thread, as each worker gets
    with tempfile.TemporaryDirectory(prefix="bench-grid-parallel-") as tmp:
        root = Path(tmp)
        folder = write_color_folder(root / "colors", per_class=48 if not args.smoke else 24)
        times, results = {}, {}
        for executor in ["sequential", *args.executors]:
            tic = time.perf_counter()
            result = mmpeft.compare(recipe(folder, root / "grids", executor, seeds, epochs))
            times[executor] = time.perf_counter() - tic
            results[executor] = numbers(root / "grids" / executor)
            failed = [r["cell"] for r in result["rows"] if r["status"] != "ok"]
            if failed:
                raise SystemExit(f"{executor}: cells failed: {', '.join(failed)}")
        print(f"\n{2 * seeds} cells ({len(METHODS)} methods x {seeds} seeds, {epochs} epochs), 1 torch thread per "
              f"cell{'  [smoke: not a measurement]' if args.smoke else ''}")
        for executor, seconds in times.items():
            same = results[executor] == results["sequential"]
            fixed = "" if executor == "sequential" else f"  fixed cost {seconds - times['sequential'] / 2:5.1f} s"
            print(f"  {executor:<11} {seconds:7.1f} s  speedup {times['sequential'] / seconds:4.2f}x{fixed}  "
                  f"per-cell metrics equal to sequential: {same}")


if __name__ == "__main__":
    main()
