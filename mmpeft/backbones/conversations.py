"""Model inputs for whole conversations (multi-turn, multi-image; data.source: llava | sharegpt | messages |
llamafactory): assistant-only labels found by rendering prefixes through the model's own chat template.

A mixin of GenerativeBackbone, which supplies `render`, `encode_one`, `stack`, `to_model` and `context_length`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mmpeft.backbones.base import BackboneError

if TYPE_CHECKING:
    from PIL import Image

SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")
IGNORE_INDEX = -100  # label value the loss skips: every prompt and padding position


class ConversationInputs:
    @property
    def image_token_id(self) -> int | None:
        """The id written once per image token in the sequence (the config's image_token_id or image_token_index)."""
        config = self.base_model.config
        for key in ("image_token_id", "image_token_index"):
            if isinstance(getattr(config, key, None), int):
                return getattr(config, key)
        return None

    def encode_conversation(self, messages: list[dict], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """One whole conversation (chat-template messages, images in order) -> processor tensors with `labels` on
        every assistant turn's tokens (its end-of-turn marker included) and IGNORE_INDEX everywhere else.

        Where each assistant turn starts and ends comes from rendering prefixes of the conversation through the
        model's own template (up to the turn's generation prompt, and up to the turn's end), tokenized with the
        images they hold: no template's markers are hard-coded, so any chat template masks correctly.
        """
        text = self.render(messages)
        full = self.encode_one(text, images)
        ids = full["input_ids"][0]
        context, cap = self.context_length, self.task.max_length
        if cap is None and context is not None and len(ids) > context:
            raise BackboneError(f"a conversation of {len(ids)} tokens exceeds the context length of "
                                f"{self.name_or_path!r} ({context}); shorten it, split it into several rows, or "
                                "set data.max_length to cut its end")
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = self._prefix_tokens(messages[:i], images, text, ids, add_generation_prompt=True)
                end = self._prefix_tokens(messages[:i + 1], images, text, ids)
                labels[start:end] = ids[start:end]
        encoded = {**full, "labels": labels[None]}
        if cap is None:
            return encoded
        length = cap if context is None else min(cap, context)
        return self._cut(encoded, length) if len(ids) > length else encoded

    def _cut(self, encoded: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """The conversation's first `length` tokens (its end is cut, as other trainers' cutoff does), unless that
        would cut an image's tokens or leave no assistant token: then the row cannot fit."""
        ids = encoded["input_ids"][0]
        image_token = self.image_token_id
        where = (ids == image_token).nonzero() if image_token is not None else ids[:0]
        if len(where) and int(where[-1]) >= length:
            raise BackboneError(f"{len(ids)} tokens, its image tokens end at token {int(where[-1]) + 1}: past "
                                f"data.max_length {length}, and image tokens are never cut (raise data.max_length, "
                                "or lower the image budget: data.max_image_edge / data.max_pixels)")
        if not (encoded["labels"][0, :length] != IGNORE_INDEX).any():
            raise BackboneError(f"{len(ids)} tokens, and no assistant token within data.max_length {length}: "
                                "nothing would be left to train on")
        return {key: value[:, :length] if key in SEQUENCE_KEYS else value for key, value in encoded.items()}

    def _prefix_tokens(self, messages: list[dict], images: list[Image.Image], full_text: str, full_ids: torch.Tensor,
                       add_generation_prompt: bool = False) -> int:
        """How many leading tokens of the whole conversation the rendered prefix `messages` accounts for."""
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        text = text if add_generation_prompt else text.rstrip()  # whitespace after end-of-turn is not the answer
        if not full_text.startswith(text):
            raise BackboneError(f"backbone.id {self.name_or_path!r}: its chat template renders the first "
                                f"{len(messages)} turn(s) differently once later turns follow ({text[-60:]!r} is "
                                "not a prefix of the whole conversation), so assistant turns cannot be masked by "
                                "rendering prefixes")
        shown = sum(part.get("type") == "image" for message in messages for part in _parts(message))
        prefix = self.encode_one(text, images[:shown])["input_ids"][0]
        n = min(len(prefix), len(full_ids))
        differs = (prefix[:n] != full_ids[:n]).nonzero()
        return int(differs[0]) if len(differs) else n

    def encode_conversations(self, conversations: list[tuple[list[dict], list[Image.Image]]],
                             padding_side: str = "right") -> dict[str, torch.Tensor]:
        """A batch of conversations with assistant-only `labels`, on the model's device."""
        parts = [self.encode_conversation(messages, images) for messages, images in conversations]
        return self.to_model(self._stack_mixed(parts, padding_side))

    def encode_prompts(self, texts: list[str], images: list[list[Image.Image]],
                       padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Rendered prompts for generation, where some rows may have no image (text-only conversation turns)."""
        parts = [self.encode_one(text, imgs) for text, imgs in zip(texts, images)]
        return self.to_model(self._stack_mixed(parts, padding_side))

    def _stack_mixed(self, parts: list[dict[str, torch.Tensor]], padding_side: str) -> dict[str, torch.Tensor]:
        """`stack`, also when text-only rows sit among rows with images (their image tensors are concatenated)."""
        if all(part.keys() == parts[0].keys() for part in parts):
            return self.stack(parts, padding_side)
        batch = self.stack([{k: v for k, v in part.items() if k in SEQUENCE_KEYS} for part in parts], padding_side)
        imaged = [{k: v for k, v in part.items() if k not in SEQUENCE_KEYS} for part in parts]
        imaged = [part for part in imaged if part]
        batch.update({key: torch.cat([part[key] for part in imaged]) for key in imaged[0]})
        return batch


def _parts(message: dict) -> list[dict]:
    content = message.get("content")
    return content if isinstance(content, list) else []
