"""`train.objective: contrastive`: CLIP's symmetric InfoNCE, or SigLIP's sigmoid loss, over image-caption batches.

Why multi-positive targets: class-labelled data captioned from templates puts many same-class or identical captions
in one batch, and an image-caption dataset may hold several captions of one image. Plain CLIP would treat those
pairs as negatives and push matching pairs apart. Here the pairs (i, j) of a batch are positives when they share a
class, a caption or an image, and each image's (each caption's) target is uniform over its positives.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mmpeft.objectives.base import OBJECTIVES, Objective

if TYPE_CHECKING:
    from mmpeft.data import ImageDataset, LabelSet

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps its learnable temperature here so logits cannot blow up


def positive_mask(labels: torch.Tensor, captions: Sequence[str], images: Sequence[object] | None = None,
                  ) -> torch.Tensor:
    """[B, B] bool: example i's image matches example j's caption (same class, same caption or same image).
    Label -1 (caption-only data) is no class: such rows match by caption and image only."""
    positives = (labels.view(-1, 1) == labels.view(1, -1)) & (labels.view(-1, 1) >= 0)
    ids = {text: i for i, text in enumerate(dict.fromkeys(captions))}
    caption_ids = torch.tensor([ids[text] for text in captions], device=labels.device)
    positives |= caption_ids.view(-1, 1) == caption_ids.view(1, -1)
    if images is not None:
        keys = {key: i for i, key in enumerate(dict.fromkeys(images))}
        image_ids = torch.tensor([keys[key] for key in images], device=labels.device)
        positives |= image_ids.view(-1, 1) == image_ids.view(1, -1)
    return positives


def clip_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy, each row's target uniform over its positives.

    `logits[i, j]` scores image i against caption j; with one positive per row this is CLIP's loss exactly.
    """
    targets = positives.to(logits.dtype)
    image_to_text = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    targets_t = targets.t()
    text_to_image = -(targets_t / targets_t.sum(1, keepdim=True) * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def siglip_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """SigLIP: -sum_ij log sigmoid(z_ij * logits_ij) / B, z = +1 for positive pairs, -1 otherwise.

    `logits` already include SigLIP's learnable bias; every pair is an independent binary decision, so several
    positives per row need no renormalisation.
    """
    signs = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def template_caption(prompts: Sequence[str], seed: int, epoch: int, index: int) -> str:
    """One of a class's prompt texts, picked by (seed, epoch, index) alone: resumed runs see the same captions."""
    return prompts[random.Random(f"mmpeft-caption:{seed}:{epoch}:{index}").randrange(len(prompts))]


@OBJECTIVES.register("contrastive")
class Contrastive(Objective):
    """Image-caption matching over a batch; trains whatever the method left trainable (towers, adapters, scale).

    Captions are the data's text column (`data.text_column`) where a row has one, else a random prompt template
    of the row's class per example and epoch. SigLIP backbones (model_type "siglip*") get the sigmoid loss.
    """

    def __init__(self, backbone, labels: LabelSet, dataset: ImageDataset | None = None):
        if backbone.head is not None:
            raise ValueError("train.objective: 'contrastive' trains image-text similarity, but this method scores "
                             "images with a linear head; use train.objective: classification")
        self.backbone, self.labels, self.dataset = backbone, labels, dataset
        self.sigmoid = backbone.model_type.startswith("siglip")
        scale = backbone.temperature()
        # A checkpoint that starts above the cap (some SigLIPs) keeps its value: the cap stops growth, never rewrites.
        self.scale_max = max(LOGIT_SCALE_MAX, float(scale.detach())) if scale is not None else LOGIT_SCALE_MAX

    # --- captions -----------------------------------------------------------------------------------------------
    def captions(self, batch: dict) -> list[str]:
        own = batch.get("texts") or [None] * len(batch["labels"])
        seed = self.dataset.seed if self.dataset is not None else 0
        epoch = self.dataset.epoch if self.dataset is not None else 0
        return [text if text else template_caption(self.labels.prompts(int(label)), seed, epoch, int(index))
                for text, label, index in zip(own, batch["labels"].tolist(), batch["index"].tolist())]

    def image_keys(self, batch: dict) -> list[object] | None:
        """Which examples share an image (several captions of one picture), when the dataset is known."""
        if "image_keys" in batch:  # a streamed batch names its images itself (`shard:key`)
            return list(batch["image_keys"])
        if self.dataset is None:
            return None
        refs = [self.dataset.examples[i].image for i in batch["index"].tolist()]
        return [ref if isinstance(ref, str) else id(ref) for ref in refs]

    def text_features(self, batch: dict, captions: list[str]) -> torch.Tensor:
        """One normalised embedding per example; each distinct caption is encoded once.

        With a prompt learner (`backbone.text_prompts`), rows without a caption of their own use their class's
        learned text feature, so the learned context trains too.
        """
        own = batch.get("texts") or [None] * len(captions)
        learner = self.backbone.text_prompts is not None
        labels = batch["labels"].tolist()
        encoded = [c for c, text in zip(captions, own) if text or not learner]
        unique = list(dict.fromkeys(encoded))
        position = {text: i for i, text in enumerate(unique)}
        features = self.backbone.encode_texts(**self.backbone.tokenize(unique)) if unique else None
        if not learner or all(own):
            return features[[position[c] for c in captions]]
        classes = self.backbone.class_text_features(self.labels)
        return torch.stack([features[position[c]] if text else classes[label]
                            for c, text, label in zip(captions, own, labels)])

    # --- loss ---------------------------------------------------------------------------------------------------
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), with a trainable scale clamped in place at the cap first (as CLIP does)."""
        scale = self.backbone.temperature()
        if scale is not None and scale.requires_grad:
            with torch.no_grad():
                scale.clamp_(max=self.scale_max)
        return self.backbone.logit_scale()

    def logits(self, batch: dict, captions: list[str] | None = None) -> torch.Tensor:
        """[B, B]: image i against caption j, scaled (plus SigLIP's bias)."""
        captions = self.captions(batch) if captions is None else captions
        if "image_features" in batch:  # cached features of a frozen image tower (mmpeft.features)
            image_features = batch["image_features"].to(self.backbone.device)
        else:
            image_features = self.backbone.encode_images(batch["pixel_values"])
        logits = image_features @ self.text_features(batch, captions).t() * self.logit_scale()
        return logits + self.backbone.logit_bias() if self.sigmoid else logits

    def loss(self, batch: dict) -> torch.Tensor:
        captions = self.captions(batch)
        positives = positive_mask(batch["labels"].to(self.backbone.device), captions, self.image_keys(batch))
        logits = self.logits(batch, captions)
        return siglip_loss(logits, positives) if self.sigmoid else clip_loss(logits, positives)
