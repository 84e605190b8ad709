"""What every tiny generative builder shares: a byte-level BPE tokenizer trained here on a few sentences (bytes
cover any text, so nothing is ever unknown), the image size and the weight scale of the random models."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["CORPUS", "IMAGE_SIZE", "INIT_STD", "build_bpe_tokenizer", "set_generation_ids"]

IMAGE_SIZE = 32
# Weight scale of the random models. transformers' default (0.02) suits wide models; at width 32 it caps every logit
# near zero (|lm_head row| x |normed hidden| ~ 0.1 x 5.7), so a frozen random head could never become confident and
# LoRA on inner layers would barely move the loss.
INIT_STD = 0.3
CORPUS = (
    "What is in the image? What digit is this? What number is shown? What colour is this image? Which shape is it?",
    "It is a photo of the digit seven. The answer is three. This is a handwritten number.",
    "zero one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9 ten",
    "red green blue yellow black white orange purple pink brown gray cat dog bird car tree square circle triangle",
    "Describe the picture. A small red square on a dark background. Yes no maybe.",
    "USER: ASSISTANT: user assistant system",
    " zero one two three four five six seven eight nine red green blue",  # leading spaces: answer words after ": "
)


def build_bpe_tokenizer(special_tokens: tuple[str, ...], vocab_size: int = 400, **roles) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `CORPUS`; `special_tokens` get the first ids; `roles` name bos/eos/pad tokens.

    No post-processor: nothing is added on encode, the chat templates write every marker themselves.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=512, padding_side="right", **roles)


def set_generation_ids(model, pad: int, eos: int, bos: int | None) -> None:
    """`generate()` stops at the template's end-of-turn token and pads with the tokenizer's pad token."""
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = bos
