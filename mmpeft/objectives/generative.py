"""`train.objective: generative`: next-token loss on the answer tokens only, for image-text-to-text backbones.

Each example becomes one chat turn (image + question) and the answer the model should give: the row's own text
(`data.text_column`) where it has one, else the class name through `data.answer_template`. Prompt tokens (image
tokens, question, template markup) and padding carry label -100, so the loss never rewards repeating the prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mmpeft.backbones.conversations import IGNORE_INDEX
from mmpeft.core.distributed import process_state, sum_over_processes
from mmpeft.data.conversations import chat_messages
from mmpeft.objectives.base import OBJECTIVES, Objective

if TYPE_CHECKING:
    from mmpeft.backbones.generative import GenerativeBackbone
    from mmpeft.data import ImageDataset, LabelSet


@OBJECTIVES.register("generative")
class AnswerLoss(Objective):
    """Mean cross-entropy over answer tokens (transformers' causal-LM loss with masked labels)."""

    def __init__(self, backbone, labels: LabelSet, dataset: ImageDataset | None = None):
        if backbone.family != "generative":
            raise ValueError("train.objective: 'generative' trains answers of image-text-to-text models, but this "
                             f"backbone is {backbone.family!r}; use train.objective: classification or contrastive, "
                             "or a generative backbone")
        self.backbone, self.labels = backbone, labels

    def answers(self, batch: dict) -> list[str]:
        return self.backbone.references(batch, self.labels)

    def inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Model inputs with `labels` set on the answer tokens only."""
        backbone = self.backbone
        texts = [backbone.prompt_text(question) for question in backbone.questions(batch)]
        answers = [backbone.answer_ids(answer) for answer in self.answers(batch)]
        return backbone.encode(texts, [[image] for image in batch["pixel_values"]], answers)

    def loss(self, batch: dict) -> torch.Tensor:
        return token_mean_loss(self.backbone, self.inputs(batch))

    def logits(self, batch: dict) -> torch.Tensor:
        """Class scores (answer log-likelihoods), as the classification objective's logits."""
        return self.backbone.logits(batch, self.backbone.class_text_features(self.labels))


class ConversationLoss(Objective):
    """Mean cross-entropy over every assistant turn's tokens of multi-turn, multi-image conversations.

    System, user and image tokens (and template markup outside assistant turns) carry label -100, as TRL's
    `assistant_only_loss` and LLaMA-Factory do; `GenerativeBackbone.encode_conversation` finds the turns.
    """

    def __init__(self, backbone: GenerativeBackbone):
        backbone.require("generative", "conversation data (data.source: llava, sharegpt, messages, llamafactory)")
        self.backbone = backbone

    def inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Model inputs of a ConversationDataset batch, `labels` on assistant tokens only."""
        pairs = [(chat_messages(turns), images) for turns, images in zip(batch["turns"], batch["images"])]
        return self.backbone.encode_conversations(pairs)

    def loss(self, batch: dict) -> torch.Tensor:
        return token_mean_loss(self.backbone, self.inputs(batch))


def token_mean_loss(backbone: GenerativeBackbone, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy per target token of the whole global batch: each process divides its sum by the target tokens
    of all processes, times their number (which DDP's gradient average divides out), so two processes train as one
    with twice the batch; a per-process mean would weight each process's tokens by how few it has."""
    targets = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
    tokens = sum_over_processes(targets).clamp(min=1)
    return backbone.model(**inputs, num_items_in_batch=tokens).loss * process_state().num_processes
