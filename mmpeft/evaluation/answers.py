"""Free-form answers from generative backbones: greedy generation, scored by exact match, normalised match
(VQA-style) and token-F1 (SQuAD-style).

Why three: exact match is strict and easy to explain; the normalised match forgives what a reader would (case,
punctuation, articles, "7" vs "seven"), as the VQA evaluation does, so a model that says "Seven." is not wrong;
token-F1 gives partial credit to long answers that share most of their words with the reference.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from mmpeft.data.loader import make_loader

if TYPE_CHECKING:
    from PIL import Image

    from mmpeft.backbones.generative import GenerativeBackbone
    from mmpeft.data import ImageDataset, LabelSet

ARTICLES = {"a", "an", "the"}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
EXAMPLES_KEPT = 10  # (prediction, reference) pairs quoted in the metrics


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces (a decimal point stays), drop articles, number words to digits."""
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text.lower())
    text = text.translate(str.maketrans({c: " " for c in string.punctuation if c != "."}))
    words = [NUMBERS.get(word, word) for word in text.split() if word not in ARTICLES]
    return " ".join(words)


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised words the two share (counted with repeats); 1.0 when both are empty."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def answer_metrics(predictions: list[str], references: list[str], questions: list[str] | None = None) -> dict:
    """{"exact_match", "normalized_match", "token_f1", "n", "examples"}: exact compares stripped strings; the
    first examples keep their question when `questions` are given."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    normal = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, references))
    examples = [{"prediction": p, "reference": r} for p, r in list(zip(predictions, references))[:EXAMPLES_KEPT]]
    for example, question in zip(examples, questions or ()):
        example["question"] = question
    nan = float("nan")
    return {"exact_match": exact / n if n else nan, "normalized_match": normal / n if n else nan,
            "token_f1": f1 / n if n else nan, "n": n, "examples": examples}


@torch.no_grad()
def generate_answers(backbone: GenerativeBackbone, texts: list[str], images: list[list[Image.Image]],
                     max_new_tokens: int) -> list[str]:
    """Greedy answers to rendered prompts (batched, left-padded), special tokens removed."""
    inputs = backbone.encode(texts, images, padding_side="left")
    tokenizer = backbone.tokenizer
    output = backbone.base_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=backbone.pad_token_id)
    new = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


@torch.no_grad()
def evaluate_answers(backbone: GenerativeBackbone, dataset: ImageDataset, labels: LabelSet, batch_size: int = 16,
                     desc: str = "answers") -> dict:
    """Generate an answer for every example of `dataset` and compare with its reference answer."""
    backbone.require("generative", "eval.generate (free-form answers)")
    was_training = backbone.training
    backbone.eval()
    loader = make_loader(dataset, backbone, batch_size=batch_size)
    predictions, wanted = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        texts = [backbone.prompt_text(question) for question in backbone.questions(batch)]
        predictions += generate_answers(backbone, texts, [[image] for image in batch["pixel_values"]],
                                        backbone.task.max_new_tokens)
        wanted += backbone.references(batch, labels)
    backbone.train(was_training)
    return answer_metrics(predictions, wanted)
