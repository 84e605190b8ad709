"""Label scoring for generative backbones: the log-likelihood of each label's answer given the image and prompt.

Why shared prefixes: all labels of one image are scored after the same prompt (image tokens, question, any in-context
demonstrations), which is nearly the whole sequence. So the prompt runs once, its key/value cache is repeated once per
label, and every label continuation runs in one more forward: two forwards per group of images instead of one per
(image, label). `score_answers_per_label` is the plain one-forward-per-label version, kept as the reference the
shared one is tested and benchmarked against.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

    from mmpeft.backbones.base import Backbone

MAX_ROWS = 64  # images x labels in one continuation forward (bounds the repeated cache and the logits)


def answer_matrix(answers: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([C, L] answer ids right-padded with `pad_id`, [C, L] mask of real tokens)."""
    if not answers or any(not answer for answer in answers):
        raise ValueError("every answer needs at least one token to be scored")
    length = max(len(answer) for answer in answers)
    ids = torch.full((len(answers), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(answers), length), dtype=torch.bool)
    for i, answer in enumerate(answers):
        ids[i, :len(answer)] = torch.tensor(answer)
        mask[i, :len(answer)] = True
    return ids, mask


def score_answers(backbone: Backbone, texts: list[str], images: list[list[Image.Image]],
                  answers: list[list[int]], length_normalize: bool = False, max_rows: int = MAX_ROWS) -> torch.Tensor:
    """[N, C] (CPU, float32): sum (or mean, `length_normalize`) of each answer's token log-probabilities.

    Prompts of equal token length are batched without padding (so positions match an unbatched run exactly); each
    group's cache is shared by all C answers.
    """
    encoded = [backbone.encode_one(text, imgs) for text, imgs in zip(texts, images)]
    return score_encoded(backbone, encoded, answers, length_normalize, max_rows)


def score_encoded(backbone: Backbone, encoded: list[dict[str, torch.Tensor]], answers: list[list[int]],
                  length_normalize: bool = False, max_rows: int = MAX_ROWS) -> torch.Tensor:
    """`score_answers` for prompts already through `backbone.encode_one` (in-context prompts measure them first)."""
    ids, mask = answer_matrix(answers, backbone.pad_token_id)
    scores = torch.empty(len(encoded), len(answers))
    by_length: dict[int, list[int]] = {}
    for i, part in enumerate(encoded):
        by_length.setdefault(part["input_ids"].shape[1], []).append(i)
    group = max(1, max_rows // len(answers))
    for members in by_length.values():
        for start in range(0, len(members), group):
            chunk = members[start:start + group]
            scores[chunk] = _score_group(backbone, [encoded[i] for i in chunk], ids, mask).float().cpu()
    return scores / mask.sum(1) if length_normalize else scores


def _score_group(backbone: Backbone, parts: list[dict], ids: torch.Tensor, mask: torch.Tensor,
                 ) -> torch.Tensor:
    """[G, C] for G prompts of one length: a prefill forward, then all G x C continuations in one forward."""
    groups, (count, length) = len(parts), ids.shape
    output = backbone.model(**backbone.to_model(backbone.stack(parts)), use_cache=length > 1)
    first = output.logits[:, -1].float().log_softmax(-1)  # predicts every answer's first token
    ids, mask = ids.to(first.device), mask.to(first.device)
    scores = first[:, ids[:, 0]]
    if length == 1:
        return scores
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = output.past_key_values
    cache.batch_repeat_interleave(count)
    # No attention mask: the prompt has no padding and answer padding only ever follows real tokens (causal).
    rest = backbone.model(input_ids=ids.repeat(groups, 1), use_cache=False, **{_cache_argument(backbone): cache})
    logprobs = rest.logits[:, :-1].float().log_softmax(-1)
    tokens = logprobs.gather(-1, ids[:, 1:].repeat(groups, 1)[..., None])[..., 0] * mask[:, 1:].repeat(groups, 1)
    return scores + tokens.sum(1).view(groups, count)


def _cache_argument(backbone: Backbone) -> str:
    """transformers 5 renamed `past_key_values` to `cache` (5.2x); use whichever this version's forward takes."""
    parameters = inspect.signature(backbone.base_model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def score_answers_per_label(backbone: Backbone, texts: list[str], images: list[list[Image.Image]],
                            answers: list[list[int]], length_normalize: bool = False) -> torch.Tensor:
    """The reference: one full forward (image included) per (image, answer). Same result as `score_answers`."""
    scores = torch.empty(len(texts), len(answers))
    for i, (text, imgs) in enumerate(zip(texts, images)):
        encoded = backbone.encode_one(text, imgs)
        start = encoded["input_ids"].shape[1]
        for j, answer in enumerate(answers):
            inputs = backbone.to_model(backbone.stack([backbone.with_answer(encoded, answer)]))
            inputs.pop("labels")
            logprobs = backbone.model(**inputs).logits[0, start - 1:-1].float().log_softmax(-1)
            target = torch.tensor(answer, device=logprobs.device)[:, None]
            total = logprobs.gather(-1, target).sum()
            scores[i, j] = total / len(answer) if length_normalize else total
    return scores
