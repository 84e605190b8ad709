"""Image<->text retrieval on a held-out split: Recall@K and median rank, with several positives per query.

A query's rank is the position of its best-ranked positive, counting every negative that scores at least as high
(ties go against the model, so a collapsed model that scores everything equal does not look perfect). A hit at K
means some positive is within the top K. Queries with no positive in the gallery (a class absent from the split)
are left out and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from mmpeft.data import ImageDataset
from mmpeft.data.loader import make_loader

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import LabelSet

KS = (1, 5, 10)


def best_positive_ranks(similarity: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """1-based rank of each query row's best positive; rows without positives are dropped."""
    similarity = np.asarray(similarity, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if similarity.shape != positives.shape:
        raise ValueError(f"similarity {similarity.shape} and positives {positives.shape} must have the same shape")
    keep = positives.any(axis=1)
    similarity, positives = similarity[keep], positives[keep]
    best = np.where(positives, similarity, -np.inf).max(axis=1, keepdims=True)
    return 1 + ((similarity >= best) & ~positives).sum(axis=1)


def direction_metrics(similarity: np.ndarray, positives: np.ndarray, ks: Sequence[int] = KS) -> dict:
    """{"R@1": ..., "R@5": ..., "R@10": ..., "median_rank", "queries", "gallery", "no_positive"} for row queries."""
    ranks = best_positive_ranks(similarity, positives)
    result: dict = {f"R@{k}": float((ranks <= k).mean()) if len(ranks) else float("nan") for k in ks}
    result["median_rank"] = float(np.median(ranks)) if len(ranks) else float("nan")
    result["queries"] = int(len(ranks))
    result["gallery"] = int(np.shape(similarity)[1])
    result["no_positive"] = int(np.shape(similarity)[0] - len(ranks))
    return result


def retrieval_metrics(similarity: np.ndarray, positives: np.ndarray, ks: Sequence[int] = KS) -> dict:
    """Both directions from one [images, texts] similarity matrix and its bool positives matrix."""
    similarity, positives = np.asarray(similarity), np.asarray(positives, dtype=bool)
    return {"image_to_text": direction_metrics(similarity, positives, ks),
            "text_to_image": direction_metrics(similarity.T, positives.T, ks)}


def retrieval_gallery(dataset: ImageDataset, labels: LabelSet) -> tuple[list[int], list[str], np.ndarray]:
    """(one example index per distinct image, the texts, positives [images, texts]).

    Texts are the split's captions (identical strings merged) when its rows have captions: an image's positives
    are its own captions. Without captions, the texts are every class prompt and an image's positives are the
    prompts of its class. Rows without a caption in a partly captioned split fall back to their class prompts.
    """
    groups: dict[object, list[int]] = {}
    for i, example in enumerate(dataset.examples):
        key = example.image if isinstance(example.image, str) else id(example.image)
        groups.setdefault(key, []).append(i)
    members = list(groups.values())
    texts: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for g, indices in enumerate(members):
        for i in indices:
            example = dataset.examples[i]
            own = [example.text] if example.text else labels.prompts(example.label)
            for text in own:
                pairs.append((g, texts.setdefault(text, len(texts))))
    positives = np.zeros((len(members), len(texts)), dtype=bool)
    for g, t in pairs:
        positives[g, t] = True
    return [indices[0] for indices in members], list(texts), positives


@torch.no_grad()
def evaluate_retrieval(backbone: Backbone, dataset: ImageDataset, labels: LabelSet, batch_size: int = 64,
                       desc: str = "retrieval") -> dict:
    """Encode the split's distinct images and texts once, score all pairs, and measure both directions."""
    was_training = backbone.training
    backbone.eval()
    image_indices, texts, positives = retrieval_gallery(dataset, labels)
    loader = make_loader(Subset(dataset, image_indices), backbone, batch_size=batch_size)
    images = torch.cat([backbone.encode_images(batch["pixel_values"])
                        for batch in tqdm(loader, desc=desc, leave=False, disable=None)])
    text_features = torch.cat([backbone.encode_texts(**backbone.tokenize(texts[i:i + batch_size]))
                               for i in range(0, len(texts), batch_size)])
    backbone.train(was_training)
    similarity = (images @ text_features.t()).cpu().numpy()
    return retrieval_metrics(similarity, positives)
