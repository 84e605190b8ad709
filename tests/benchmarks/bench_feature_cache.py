"""The frozen-tower feature cache on a grid: one method x 3 seeds x 10 epochs, with and without the cache.

    python tests/benchmarks/bench_feature_cache.py [--method linear_probe] [--seeds 3] [--epochs 10]

Runs the same compare grid twice in this process (digits rotated by 90 degrees, 16 shots, the demo CLIP): first with
`train.feature_cache=recompute`, then with `memory` starting from an empty cache, so the cached time includes the
one-off feature extraction. Checks that every cell's test metrics and validation history are identical and prints
the wall-time ratio of the whole grid and of the training loops (target: >= 5x for the grid).

Measured 2026-11-25 on the shared 2-core CPU machine (other jobs running, load 3-7), identical metrics each time:
    linear_probe, 2 torch threads: 26.3 s -> 4.7 s  grid 5.6x, training loops 7.8x
    linear_probe, --threads 1:     10.9 s -> 2.1 s  grid 5.2x, training loops 18.9x
    coop (n_ctx 8), 2 threads:     66.2 s -> 3.0 s  grid 22.1x, training loops 78.3x
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mmpeft  # noqa: E402
from mmpeft.features import PROCESS_CACHE  # noqa: E402

METHODS = {"linear_probe": {"preset": "linear-probe", "label": "linear_probe", "train": {"lr": 0.3}},
           "coop": {"preset": "coop-16", "n_ctx": 8, "label": "coop-8"}}


def recipe(method: str, seeds: int, epochs: int, out: Path, backbone: str) -> dict:
    return {
        "name": "bench-feature-cache", "seed": 0, "backbone": {"id": backbone},
        "data": {"source": "digits", "subset": "heldout", "templates": ["a photo of the digit {label}."],
                 "shots": 16, "shift": ["rot90"]},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.003},
        "grid": {"methods": [METHODS[method]], "seeds": list(range(seeds))},
        "output": {"dir": str(out)},
    }


def run_grid(spec: dict, name: str, cache: str) -> tuple[float, dict]:
    PROCESS_CACHE.clear()
    tic = time.perf_counter()
    result = mmpeft.compare(spec, {"output.name": name, "train.feature_cache": cache})
    return time.perf_counter() - tic, result


def cell_outcomes(result: dict) -> dict:
    grid = Path(result["dir"])
    outcomes = {}
    for row in result["rows"]:
        metrics = json.loads((grid / "cells" / row["cell"] / "metrics.json").read_text())
        outcomes[row["cell"]] = (metrics["test"]["accuracy"], metrics["test"]["macro_f1"],
                                 metrics["train"]["history"])
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="linear_probe")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--backbone", default="mmpeft-demo/digits-clip")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 on a machine shared with other jobs: spinning threads of "
                             "two jobs on the same cores make every small op many times slower)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        spec = recipe(args.method, args.seeds, args.epochs, Path(out), args.backbone)
        mmpeft.load_recipe({k: v for k, v in spec.items() if k != "grid"} | {"method": "zero_shot"})
        plain_s, plain = run_grid(spec, "recompute", "recompute")
        cached_s, cached = run_grid(spec, "cached", "memory")
        same = cell_outcomes(plain) == cell_outcomes(cached)
        loop = [sum(r["train_seconds"] for r in result["rows"]) for result in (plain, cached)]
        extraction = sum(json.loads((Path(cached["dir"]) / "cells" / r["cell"] / "metrics.json").read_text())
                         ["feature_cache"].get("seconds", 0.0) for r in cached["rows"])
    print(f"\n{args.method} grid: {args.seeds} seeds x {args.epochs} epochs on {args.backbone}, digits rot90, "
          f"16 shots, {torch.get_num_threads()} torch threads")
    print(f"  without cache: {plain_s:7.1f} s  (training loops {loop[0]:.1f} s)")
    print(f"  with cache:    {cached_s:7.1f} s  (training loops {loop[1]:.1f} s, "
          f"feature extraction {extraction:.1f} s)")
    print(f"  grid speed-up: {plain_s / cached_s:.1f}x   training-loop speed-up: {loop[0] / max(loop[1], 1e-9):.1f}x")
    print(f"  identical test metrics and validation histories in every cell: {same}")
    accuracies = [f"{r['accuracy']:.4f}" for r in cached["rows"]]
    print(f"  test accuracy per seed: {', '.join(accuracies)}")
    if not same:
        raise SystemExit("cached and uncached grids differ")


if __name__ == "__main__":
    main()
