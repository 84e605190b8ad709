"""In-context few-shot prompts for generative backbones: k demonstrations (image, question, answer) before the query.

Why these pieces: the demonstrations are earlier chat turns in the model's own template, so the model sees them as a
conversation it already had. Which demonstrations are shown matters as much as how many, so three strategies are
compared: `random` (by seed), `balanced` (classes in turn) and `nearest` (most similar train images by the backbone's
own image embedding, the most similar placed last, next to the query). A prompt longer than the model's context is
shortened by dropping whole demonstrations, farthest from the query first, and every drop is counted; tokens are never
cut. Classification is by label scoring (mmpeft.backbones.scoring), so k = 0 is the zero-shot baseline.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mmpeft.backbones.scoring import score_encoded
from mmpeft.core.io import write_json, write_text
from mmpeft.evaluation.metrics import classification_metrics
from mmpeft.report.plots import plt, save_figure

if TYPE_CHECKING:
    from PIL import Image

    from mmpeft.backbones.generative import GenerativeBackbone
    from mmpeft.specs import Recipe

logger = logging.getLogger("mmpeft")

STRATEGIES = ("random", "balanced", "nearest")
DEFAULT_SHOTS = (0, 1, 2, 4)
ROWS_FILE, TABLE_FILE, PLOT_FILE = "icl.json", "icl.md", "icl_accuracy.png"
CHUNK = 32  # queries whose prompts are scored together (equal-length prompts share forwards)


@dataclass(frozen=True)
class Demo:
    """One demonstration: an image with the question asked and the answer given."""

    image: Image.Image
    question: str
    answer: str


@dataclass
class IclPrompt:
    """A rendered in-context prompt: its text, its images in order (demonstrations, then the query), its encoding,
    the demonstrations kept and how many were dropped to fit the context."""

    text: str
    images: list[Image.Image]
    encoded: dict[str, torch.Tensor]
    kept: list[Demo]
    dropped: int
    over_limit: bool  # still longer than the limit with every demonstration dropped


def check_strategies(strategies: Sequence[str]) -> None:
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"in-context strategies: unknown {', '.join(map(repr, unknown))}; valid: "
                         f"{', '.join(STRATEGIES)}")


def select_demos(strategy: str, k: int, labels: Sequence[int], seed: int, query: int,
                 similarity: np.ndarray | None = None) -> list[int]:
    """Indices into the train pool, in prompt order. Random and balanced are nested in k for one (seed, query)."""
    check_strategies([strategy])
    k = min(k, len(labels))
    if k <= 0:
        return []
    rng = random.Random(f"mmpeft-icl:{seed}:{query}")
    if strategy == "nearest":
        if similarity is None:
            raise ValueError("strategy 'nearest' needs the query's similarity to every train image")
        top = np.argsort(-similarity, kind="stable")[:k]
        return [int(i) for i in top[::-1]]  # most similar last, next to the query
    if strategy == "random":
        order = list(range(len(labels)))
        rng.shuffle(order)
        return order[:k]
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    classes = sorted(by_class)
    rng.shuffle(classes)
    for members in by_class.values():
        rng.shuffle(members)
    chosen, turn = [], 0
    while len(chosen) < k:
        members = by_class[classes[turn % len(classes)]]
        if turn // len(classes) < len(members):
            chosen.append(members[turn // len(classes)])
        turn += 1
    return chosen


def build_prompt(backbone: GenerativeBackbone, demos: Sequence[Demo], question: str, image: Image.Image,
                 max_length: int | None = None) -> IclPrompt:
    """The query's prompt after `demos`; beyond `max_length` tokens, whole demonstrations go, the first first."""
    kept = list(demos)
    while True:
        text = backbone.prompt_text(question, [(d.question, d.answer) for d in kept])
        images = [d.image for d in kept] + [image]
        encoded = backbone.encode_one(text, images)
        length = encoded["input_ids"].shape[1]
        if max_length is None or length <= max_length or not kept:
            over = max_length is not None and length > max_length
            return IclPrompt(text, images, encoded, kept, len(demos) - len(kept), over)
        kept = kept[1:]


def sweep_seed(backbone: GenerativeBackbone, data, recipe: Recipe, seed: int, shots: Sequence[int],
               strategies: Sequence[str], max_queries: int | None, limit: int | None) -> list[dict]:
    """One row per (k, strategy). A strategy that fails (say, nearest-neighbour embeddings a backbone cannot make)
    fails only its own rows, with status "failed" and the error; the other strategies' rows stand."""
    sweep = SeedSweep(backbone, data, recipe.eval.length_normalize, seed, max_queries, limit)
    rows, zero_shot = [], None
    for k in shots:
        for strategy in strategies:
            if k == 0 and zero_shot is not None:  # no demonstrations: identical for every strategy
                rows.append({**zero_shot, "method": f"icl-{strategy}", "strategy": strategy})
                continue
            try:
                row = sweep.row(strategy, k)
            except Exception as error:  # noqa: BLE001  (recorded in the row; the other strategies go on)
                row = _failed_row(strategy, k, seed, error)
            zero_shot = row if k == 0 else zero_shot
            rows.append(row)
    return rows


class SeedSweep:
    """The queries of one seed, the demonstration pool (built as used) and, once needed, nearest-neighbour
    similarities; `row(strategy, k)` scores every query with k demonstrations."""

    def __init__(self, backbone: GenerativeBackbone, data, length_normalize: bool, seed: int,
                 max_queries: int | None, limit: int | None):
        self.backbone, self.seed, self.limit, self.length_normalize = backbone, seed, limit, length_normalize
        self.train, test = data.dataset("train"), data.dataset("test")
        self.queries = list(range(len(test)))
        if max_queries is not None and len(self.queries) > max_queries:
            self.queries = sorted(random.Random(f"mmpeft-icl-queries:{seed}").sample(self.queries, max_queries))
        self.items = [test[i] for i in self.queries]
        self.answers = backbone.class_text_features(data.labels)
        self.names = data.labels.names
        self.pool: dict[int, Demo] = {}
        self.similarity: np.ndarray | None = None

    def demo(self, index: int) -> Demo:
        if index not in self.pool:
            example = self.train.examples[index]
            question = example.prompt or self.backbone.task.question
            answer = example.text or self.backbone.task.answer_template.format(label=self.names[example.label])
            self.pool[index] = Demo(self.train[index]["image"], question, answer)
        return self.pool[index]

    def nearest(self) -> np.ndarray:
        """[queries, pool] cosine similarity of image embeddings, computed on first use."""
        if self.similarity is None:
            pool_images = [self.train[i]["image"] for i in range(len(self.train))]
            query_vectors = self.backbone.image_embeddings([item["image"] for item in self.items])
            self.similarity = (query_vectors @ self.backbone.image_embeddings(pool_images).t()).cpu().numpy()
        return self.similarity

    def row(self, strategy: str, k: int) -> dict:
        tic = time.perf_counter()
        near = self.nearest() if strategy == "nearest" and k > 0 else None
        prompts = []
        for position, (query, item) in enumerate(zip(self.queries, self.items)):
            chosen = select_demos(strategy, k, self.train.labels, self.seed, query,
                                  near[position] if near is not None else None)
            question = item.get("prompt") or self.backbone.task.question
            prompts.append(build_prompt(self.backbone, [self.demo(i) for i in chosen], question, item["image"],
                                        self.limit))
        predicted = np.concatenate([
            score_encoded(self.backbone, [p.encoded for p in prompts[i:i + CHUNK]], self.answers,
                          self.length_normalize).argmax(-1).numpy()
            for i in range(0, len(prompts), CHUNK)])
        truth = np.array([item["label"] for item in self.items])
        return _row(strategy, k, self.seed, truth, predicted, self.names, prompts, time.perf_counter() - tic)


def _failed_row(strategy: str, k: int, seed: int, error: Exception) -> dict:
    text = str(error).strip()
    message = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    logger.error("in-context %s k=%d seed %d failed: %s", strategy, k, seed, message,
                 exc_info=logger.isEnabledFor(logging.DEBUG))
    return {"method": f"icl-{strategy}", "strategy": strategy, "shots": k, "seed": seed, "status": "failed",
            "error": message}


def _row(strategy: str, k: int, seed: int, truth: np.ndarray, predicted: np.ndarray, names: list[str],
         prompts: list[IclPrompt], seconds: float) -> dict:
    scores = classification_metrics(truth, predicted, names)
    truncated = sum(p.dropped > 0 for p in prompts)
    over = sum(p.over_limit for p in prompts)
    if truncated or over:
        logger.warning("in-context %s k=%d seed %d: %d of %d prompts exceeded the context; %d demonstrations dropped"
                       "%s", strategy, k, seed, truncated, len(prompts), sum(p.dropped for p in prompts),
                       f"; {over} too long even without demonstrations" if over else "")
    return {"method": f"icl-{strategy}", "strategy": strategy, "shots": k, "seed": seed, "status": "ok",
            "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "n": scores["n"],
            "truncated_prompts": truncated, "dropped_demos": sum(p.dropped for p in prompts),
            "over_limit": over, "seconds": round(seconds, 3)}


def summarize(rows: list[dict]) -> dict[str, dict[int, tuple[float, float, int]]]:
    """{strategy: {k: (mean accuracy, std over seeds, seeds)}}, over the rows that did not fail."""
    grouped: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        grouped.setdefault(row["strategy"], {}).setdefault(row["shots"], []).append(row["accuracy"])
    return {strategy: {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in sorted(by_k.items())}
            for strategy, by_k in grouped.items()}


def write_outputs(out_dir: Path, rows: list[dict], title: str) -> None:
    """icl.json (rows), icl.md (accuracy vs k per strategy, mean +- std over seeds) and the plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / ROWS_FILE, rows)
    summary = summarize(rows)
    ks = sorted({row["shots"] for row in rows})
    lines = [f"# In-context prompting: {title}", "", "Accuracy (mean +- std over seeds) by demonstrations per query.",
             "", "| strategy | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for strategy, by_k in summary.items():
        cells = [f"{by_k[k][0]:.4f} +- {by_k[k][1]:.4f}" if k in by_k else "" for k in ks]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    truncated = sum(row.get("truncated_prompts", 0) for row in rows)
    if truncated:
        lines += ["", f"{truncated} prompts exceeded the model's context and lost whole demonstrations "
                  f"({sum(row.get('dropped_demos', 0) for row in rows)} in all); see {ROWS_FILE}."]
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        lines += ["", "Failed rows (not in the table):", ""]
        lines += [f"- {row['strategy']} k={row['shots']} seed {row['seed']}: {row['error']}" for row in failed]
    lines += ["", f"![accuracy vs k]({PLOT_FILE})", ""]
    write_text(out_dir / TABLE_FILE, "\n".join(lines))
    plot_accuracy(summary, out_dir / PLOT_FILE, title)


def plot_accuracy(summary: dict[str, dict[int, tuple[float, float, int]]], path: Path, title: str) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    ks = sorted({k for by_k in summary.values() for k in by_k})
    position = {k: i for i, k in enumerate(ks)}  # evenly spaced: k is usually 0, 1, 2, 4, 8
    for strategy, by_k in summary.items():
        x = [position[k] for k in by_k]
        mean = np.array([v[0] for v in by_k.values()])
        std = np.array([v[1] for v in by_k.values()])
        axes.plot(x, mean, marker="o", label=strategy)
        axes.fill_between(x, mean - std, mean + std, alpha=0.15)
    axes.set_xticks(range(len(ks)), [str(k) for k in ks])
    axes.set_xlabel("demonstrations per query (k)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"In-context prompting: {title}")
    axes.legend()
    save_figure(figure, path)
