"""Contrastive objective (CLIP / SigLIP, multi-positive), retrieval metrics, scratch init, shifts and subsets.

Losses and recalls are checked against hand computations written out element by element; nothing here downloads
or pre-trains (the demo backbone is tests/test_demo_backbone.py's business).
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import mmpeft
from mmpeft.backbones import load_backbone
from mmpeft.core.schema import RecipeError
from mmpeft.data import SHIFTS, Example, ImageDataset, LabelSet, apply_shifts, collate_images, load_data
from mmpeft.data.digits import partition_digits
from mmpeft.evaluation.retrieval import best_positive_ranks, retrieval_gallery, retrieval_metrics
from mmpeft.objectives.contrastive import (
    LOGIT_SCALE_MAX,
    Contrastive,
    clip_loss,
    positive_mask,
    siglip_loss,
    template_caption,
)
from mmpeft.runs.recipe import load_recipe
from mmpeft.specs import AugmentSpec, BackboneSpec, DataSpec

LABELS = [0, 1, 0, 2]
CAPTIONS = ["a cat.", "a dog.", "a kitten.", "a cat."]  # 0 and 3 share a caption across classes 0 and 2


def hand_positives() -> list[list[bool]]:
    return [[LABELS[i] == LABELS[j] or CAPTIONS[i] == CAPTIONS[j] for j in range(4)] for i in range(4)]


def hand_clip_loss(logits: list[list[float]], positives: list[list[bool]]) -> float:
    """Written out: for each row, -sum over positives of (1/#positives) * log softmax; both directions averaged."""
    n = len(logits)

    def direction(rows: list[list[float]], pos: list[list[bool]]) -> float:
        total = 0.0
        for i in range(n):
            log_norm = math.log(sum(math.exp(v) for v in rows[i]))
            count = sum(pos[i])
            total += -sum((rows[i][j] - log_norm) / count for j in range(n) if pos[i][j])
        return total / n

    transposed = [[logits[j][i] for j in range(n)] for i in range(n)]
    pos_t = [[positives[j][i] for j in range(n)] for i in range(n)]
    return (direction(logits, positives) + direction(transposed, pos_t)) / 2


def hand_siglip_loss(logits: list[list[float]], positives: list[list[bool]]) -> float:
    n = len(logits)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if positives[i][j] else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-z * logits[i][j])))
    return total / n


# ---------------------------------------------------------------- losses


def test_positive_mask_shares_class_caption_or_image() -> None:
    mask = positive_mask(torch.tensor(LABELS), CAPTIONS)
    assert mask.tolist() == hand_positives()
    assert mask[0, 3] and mask[0, 2] and not mask[1, 3]  # same caption / same class / neither
    with_images = positive_mask(torch.tensor(LABELS), CAPTIONS, images=["x", "y", "z", "y"])
    assert with_images[1, 3] and with_images[3, 1]


def test_clip_loss_equals_hand_computation_with_duplicate_captions() -> None:
    logits = torch.tensor(np.random.default_rng(0).normal(0, 3, (4, 4)), dtype=torch.float64)
    positives = positive_mask(torch.tensor(LABELS), CAPTIONS)
    expected = hand_clip_loss(logits.tolist(), hand_positives())
    assert clip_loss(logits, positives).item() == pytest.approx(expected, rel=1e-12)
    eye = torch.eye(4, dtype=torch.bool)  # one positive per row: exactly CLIP's loss
    plain = (torch.nn.functional.cross_entropy(logits, torch.arange(4))
             + torch.nn.functional.cross_entropy(logits.t(), torch.arange(4))) / 2
    assert clip_loss(logits, eye).item() == pytest.approx(plain.item(), rel=1e-12)


def test_siglip_loss_equals_hand_computation() -> None:
    logits = torch.tensor(np.random.default_rng(1).normal(0, 3, (4, 4)), dtype=torch.float64)
    positives = positive_mask(torch.tensor(LABELS), CAPTIONS)
    expected = hand_siglip_loss(logits.tolist(), hand_positives())
    assert siglip_loss(logits, positives).item() == pytest.approx(expected, rel=1e-12)


def batch_of(backbone, labels: list[int], texts: list[str | None]) -> dict:
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in labels]
    items = [{"image": im, "label": label, "index": i, **({"text": t} if t else {})}
             for i, (im, label, t) in enumerate(zip(images, labels, texts))]
    return collate_images(backbone.preprocess)(items)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_objective_loss_is_the_hand_loss_of_the_model_scores(kind: str, tiny_clip_dir, tiny_siglip_dir) -> None:
    """The objective wires captions, features, scale (and SigLIP's bias) into the hand-checked losses."""
    backbone = load_backbone(BackboneSpec(id=str(tiny_clip_dir if kind == "clip" else tiny_siglip_dir)))
    labels = LabelSet(["cat", "dog", "bird"])
    objective = Contrastive(backbone, labels)
    batch = batch_of(backbone, LABELS, CAPTIONS)
    with torch.no_grad():
        loss = objective.loss(batch).item()
        images = backbone.encode_images(batch["pixel_values"])
        texts = backbone.encode_texts(**backbone.tokenize(CAPTIONS))
        scale = backbone.base_model.logit_scale.exp().item()
        logits = (images @ texts.t() * scale).double()
    if kind == "clip":
        expected = hand_clip_loss(logits.tolist(), hand_positives())
    else:
        expected = hand_siglip_loss((logits + backbone.base_model.logit_bias.item()).tolist(), hand_positives())
    assert objective.sigmoid == (kind == "siglip")
    assert loss == pytest.approx(expected, rel=1e-4)


def test_captions_fall_back_to_seeded_class_templates(tiny_clip_dir) -> None:
    backbone = load_backbone(BackboneSpec(id=str(tiny_clip_dir)))
    labels = LabelSet(["cat", "dog"], templates=["a {label}.", "a photo of a {label}.", "art of a {label}."])
    examples = [Example(f"img{i}.png", i % 2) for i in range(12)]
    dataset = ImageDataset(examples, seed=3)
    objective = Contrastive(backbone, labels, dataset)
    batch = {"labels": torch.tensor([e.label for e in examples]), "index": torch.arange(12),
             "texts": ["my own caption."] + [None] * 11}
    first = objective.captions(batch)
    assert first[0] == "my own caption."
    assert all(c in labels.prompts(e.label) for c, e in zip(first[1:], examples[1:]))
    assert objective.captions(batch) == first  # same seed, epoch, index: same captions
    dataset.set_epoch(1)
    assert objective.captions(batch) != first  # a new epoch draws again
    assert template_caption(["a", "b", "c"], 3, 1, 5) == template_caption(["a", "b", "c"], 3, 1, 5)


def test_trainable_logit_scale_is_capped(tiny_clip_dir) -> None:
    backbone = load_backbone(BackboneSpec(id=str(tiny_clip_dir)))
    with torch.no_grad():
        backbone.base_model.logit_scale.fill_(7.0)
    objective = Contrastive(backbone, LabelSet(["cat", "dog", "bird"]))
    assert objective.scale_max == pytest.approx(7.0)  # a checkpoint above the cap keeps its value ...
    with torch.no_grad():
        backbone.base_model.logit_scale.fill_(2.0)
    objective = Contrastive(backbone, LabelSet(["cat", "dog", "bird"]))
    with torch.no_grad():
        backbone.base_model.logit_scale.fill_(9.0)  # ... but training can never push it past the cap
    objective.loss(batch_of(backbone, LABELS, CAPTIONS))
    assert backbone.base_model.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_contrastive_run_trains_and_reports_retrieval(method: str, color_recipe, tmp_path) -> None:
    color_recipe["method"] = {"name": method} if method == "full" else color_recipe["method"]
    color_recipe["train"].update({"objective": "contrastive", "epochs": 1})
    metrics = mmpeft.run(color_recipe)
    retrieval = metrics["retrieval"]
    assert set(retrieval) == {"zero_shot", "test"}
    for result in retrieval.values():
        assert set(result["image_to_text"]) >= {"R@1", "R@5", "R@10", "median_rank"}
        assert result["text_to_image"]["queries"] == 3  # one prompt per colour class
    assert metrics["train"]["steps"] > 0
    report = (tmp_path / "runs" / "run" / "report.md").read_text()
    assert "## Retrieval" in report and "| after training |" in report
    assert json.loads((tmp_path / "runs" / "run" / "metrics.json").read_text())["retrieval"] == retrieval


def test_retrieval_can_be_turned_off_and_on(color_recipe) -> None:
    color_recipe["train"].update({"objective": "contrastive", "epochs": 1})
    assert "retrieval" not in mmpeft.run({**color_recipe, "eval": {"retrieval": False}, "method": "zero_shot"})
    color_recipe["output"]["name"] = "second"
    assert "retrieval" in mmpeft.run({**color_recipe, "eval": {"retrieval": True}, "method": "zero_shot"})


# ---------------------------------------------------------------- retrieval


def test_retrieval_recalls_equal_hand_computation() -> None:
    similarity = np.array([
        [0.9, 0.1, 0.3, 0.2],   # image 0: positive text 0 ranks 1
        [0.8, 0.2, 0.7, 0.1],   # image 1: positives 1 and 3 -> best is text 1 (0.2); 2 negatives above -> rank 3
        [0.5, 0.5, 0.4, 0.6],   # image 2: positive text 0 ties with negative text 1, text 3 above -> rank 3
        [0.1, 0.2, 0.3, 0.4],   # image 3: no positive text: left out of image->text
    ])
    positives = np.array([
        [1, 0, 0, 0],
        [0, 1, 0, 1],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
    ], dtype=bool)
    assert best_positive_ranks(similarity, positives).tolist() == [1, 3, 3]
    result = retrieval_metrics(similarity, positives, ks=(1, 2, 3))
    i2t, t2i = result["image_to_text"], result["text_to_image"]
    assert (i2t["R@1"], i2t["R@2"], i2t["R@3"]) == pytest.approx((1 / 3, 1 / 3, 1.0))
    assert i2t["median_rank"] == 3 and i2t["queries"] == 3 and i2t["no_positive"] == 1 and i2t["gallery"] == 4
    # text 0 (positives: images 0, 2): image 0 scores 0.9, top of column -> rank 1
    # text 1 (positive: image 1, 0.2): images 2 (0.5) and 3 (0.2, a tie) are negatives at or above -> rank 3
    # text 2: no positive image; text 3 (positive: image 1, 0.1): images 2, 3, 0 above -> rank 4
    assert best_positive_ranks(similarity.T, positives.T).tolist() == [1, 3, 4]
    assert (t2i["R@1"], t2i["R@2"], t2i["R@3"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    assert t2i["median_rank"] == 3 and t2i["no_positive"] == 1


def test_retrieval_gallery_captions_and_class_prompts() -> None:
    labels = LabelSet(["0", "1"], names={"0": "zero", "1": "one"}, templates=["a {label}.", "the {label}."])
    captioned = ImageDataset([Example("a.png", 0, "a round zero."), Example("a.png", 0, "an oval."),
                              Example("b.png", 1, "a stick."), Example("c.png", 1, "a stick.")])
    images, texts, positives = retrieval_gallery(captioned, labels)
    assert images == [0, 2, 3] and texts == ["a round zero.", "an oval.", "a stick."]
    assert positives.tolist() == [[True, True, False], [False, False, True], [False, False, True]]
    plain = ImageDataset([Example("a.png", 0), Example("b.png", 1)])
    images, texts, positives = retrieval_gallery(plain, labels)
    assert texts == ["a zero.", "the zero.", "a one.", "the one."]
    assert positives.tolist() == [[True, True, False, False], [False, False, True, True]]


# ---------------------------------------------------------------- init, recipes, shifts, subsets


def test_scratch_init_is_random_seeded_and_keeps_the_processor(tiny_clip_dir) -> None:
    pretrained = load_backbone(BackboneSpec(id=str(tiny_clip_dir)))
    torch.manual_seed(5)
    first = load_backbone(BackboneSpec(id=str(tiny_clip_dir), init="scratch"))
    torch.manual_seed(5)
    again = load_backbone(BackboneSpec(id=str(tiny_clip_dir), init="scratch"))
    weight = "text_model.embeddings.token_embedding.weight"
    state = {name: dict(b.model.named_parameters())[weight] for name, b in
             (("pretrained", pretrained), ("first", first), ("again", again))}
    assert torch.equal(state["first"], state["again"]) and not torch.equal(state["first"], state["pretrained"])
    assert first.tokenizer("a cat.")["input_ids"] == pretrained.tokenizer("a cat.")["input_ids"]


def test_recipe_rejects_bad_shift_names_subset_and_scratch_quantization() -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe({"method": "lora", "data": {"shift": ["rot90+invrt"], "eval_shifts": ["none", "rot45"]}})
    problems = caught.value.problems
    assert problems[0].startswith("data.shift[0]: unknown image shift 'invrt'")
    assert "did you mean 'invert'" in problems[0]
    assert problems[1].startswith("data.eval_shifts[1]: unknown image shift 'rot45'") and "valid shifts:" in problems[1]
    with pytest.raises(RecipeError, match="data.subset: 'heldout' applies to data.source: digits only"):
        load_recipe({"method": "lora", "data": {"source": "folder", "path": ".", "subset": "heldout"}})
    with pytest.raises(RecipeError, match="data.subset: 'test' is not one of 'pretrain', 'heldout'"):
        load_recipe({"method": "lora", "data": {"subset": "test"}})
    with pytest.raises(RecipeError, match="backbone.init: 'scratch' cannot be combined with backbone.quantization"):
        load_recipe({"method": "lora", "backbone": {"init": "scratch", "quantization": {"bits": 4}}})


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_every_shift_is_deterministic(name: str) -> None:
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    first, again = apply_shifts(image, name, 11), apply_shifts(image.copy(), name, 11)
    assert np.array_equal(np.asarray(first), np.asarray(again))


def test_affine_augmentation_is_seeded_and_small(tmp_path) -> None:
    path = tmp_path / "digit.png"
    pixels = np.zeros((24, 24, 3), dtype=np.uint8)
    pixels[6:18, 10:14] = 255
    Image.fromarray(pixels).save(path)
    spec = AugmentSpec(affine_degrees=10, affine_translate=0.1)
    dataset = ImageDataset([Example(str(path), 0)], augment=spec, seed=1)
    first, again = np.asarray(dataset[0]["image"]), np.asarray(dataset[0]["image"])
    assert np.array_equal(first, again) and not np.array_equal(first, pixels)
    assert abs(int(first.astype(int).sum()) - int(pixels.astype(int).sum())) < 0.25 * pixels.astype(int).sum()
    with pytest.raises(ValueError, match="data.augment.affine_translate must be in"):
        ImageDataset([Example(str(path), 0)], augment=AugmentSpec(affine_translate=1.5))


def test_digits_subsets_are_a_fixed_disjoint_stratified_partition(monkeypatch) -> None:
    examples = [Example(f"{i}.png", i % 10) for i in range(1797)]
    pretrain, heldout = partition_digits(examples)
    assert (len(pretrain), len(heldout)) == (1078, 719)
    assert {e.image for e in pretrain}.isdisjoint({e.image for e in heldout})
    counts = np.bincount([e.label for e in pretrain], minlength=10)
    assert counts.min() >= 107 and counts.max() <= 108
    random.seed(99)
    np.random.seed(99)
    assert partition_digits(examples) == (pretrain, heldout)  # no global RNG involved
    split = load_data(DataSpec(subset="heldout"), seed=1)
    seen = {e.image for e in load_data(DataSpec(subset="pretrain"), seed=4).train}
    assert len(seen) == 1078
    assert seen.isdisjoint(e.image for e in split.train + split.val + split.test)
    assert sum(split.info["counts"].values()) == 719 and split.info["subset"] == "heldout"
