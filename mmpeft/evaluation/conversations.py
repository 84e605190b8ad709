"""Conversation data evaluated: assistant-token loss on a split and, with `eval.generate`, the last answer generated.

The loss is the mean negative log-likelihood over all assistant tokens of the split (token-weighted, so a long
answer counts for its length, as in training); generation gives the model every turn but the last assistant one and
scores its greedy answer by exact and normalised match (mmpeft.evaluation.answers).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmpeft.backbones.generative import IGNORE_INDEX
from mmpeft.data.conversations import IMAGE_PLACEHOLDER, chat_messages, last_answer
from mmpeft.evaluation.answers import answer_metrics
from mmpeft.objectives.generative import ConversationLoss

if TYPE_CHECKING:
    from mmpeft.backbones.generative import GenerativeBackbone
    from mmpeft.data.conversation_data import ConversationDataset


def _batches(dataset: ConversationDataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate)


@torch.no_grad()
def assistant_loss(backbone: GenerativeBackbone, dataset: ConversationDataset, batch_size: int = 8,
                   desc: str = "loss") -> dict:
    """{"loss": mean NLL per assistant token, "perplexity", "tokens", "n"} over `dataset`."""
    objective = ConversationLoss(backbone)
    was_training = backbone.training
    backbone.eval()
    total, tokens = 0.0, 0
    for batch in tqdm(_batches(dataset, batch_size), desc=desc, leave=False, disable=None):
        inputs = objective.inputs(batch)
        labels = inputs.pop("labels")
        logits = backbone.model(**inputs).logits.float()
        targets = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   ignore_index=IGNORE_INDEX, reduction="sum").item()
        tokens += int((targets != IGNORE_INDEX).sum())
    backbone.train(was_training)
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": tokens,
            "n": len(dataset)}


@torch.no_grad()
def last_turn_answers(backbone: GenerativeBackbone, dataset: ConversationDataset, batch_size: int = 8,
                      max_new_tokens: int = 16, desc: str = "answers") -> dict:
    """Greedy answers to each conversation's last user turn (all earlier turns given), exact/normalised match."""
    backbone.require("generative", "eval.generate (free-form answers)")
    was_training = backbone.training
    backbone.eval()
    predictions, references, questions = [], [], []
    for batch in tqdm(_batches(dataset, batch_size), desc=desc, leave=False, disable=None):
        texts = []
        for turns in batch["turns"]:
            asked, answer = last_answer(turns)
            texts.append(backbone.render(chat_messages(asked), add_generation_prompt=True))
            references.append(answer)
            questions.append(asked[-1].text.replace(IMAGE_PLACEHOLDER, "").strip())
        predictions += _generate(backbone, texts, batch["images"], max_new_tokens)
    backbone.train(was_training)
    return answer_metrics(predictions, references, questions)


def _generate(backbone: GenerativeBackbone, texts: list[str], images: list[list], max_new_tokens: int,
              ) -> list[str]:
    """Greedy answers, as `answers.generate_answers`, for batches that mix text-only rows with image rows."""
    inputs = backbone.encode_prompts(texts, images, padding_side="left")
    output = backbone.base_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=backbone.pad_token_id)
    new = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in backbone.tokenizer.batch_decode(new, skip_special_tokens=True)]
