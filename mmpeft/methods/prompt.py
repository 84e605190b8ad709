"""Prompt learning for dual encoders: CoOp-style text context vectors (`coop`) and VPT-shallow visual tokens (`vpt`).

Both learn input embeddings and leave every backbone weight frozen. They enter the towers through forward hooks on
embedding modules, because transformers 5's CLIP/SigLIP text models take only `input_ids` (no `inputs_embeds`):
- coop: each class text is `[bos] X X ... X <class name>. [eos]`; a hook on the token embedding swaps the n_ctx
  placeholder embeddings for the learned context. The ids stay real, so CLIP still pools at its eos position and
  SigLIP at the last one. The hook exists only while `text_prompts` runs, so plain text encoding is unaffected.
- vpt: a permanent hook on the vision embeddings inserts n learned tokens after the CLS token (CLIP) or in front
  of the patches (SigLIP has no CLS; its attention-pooling head sees them like any other token).
Generative backbones will get peft's prompt tuning instead, in a later version.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import torch
from torch import nn

from mmpeft.core.schema import Range
from mmpeft.methods.base import Method, MethodConfig, freeze, register, require_labels

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.data import LabelSet

GENERATIVE_LATER = " (peft prompt tuning for generative backbones is planned for a later version; use lora there)"
PLACEHOLDER = "X"  # CoOp's placeholder word; its embedding is replaced, only its id is used


@dataclass(frozen=True)
class CoOpSpec(MethodConfig):
    name: str = "coop"
    n_ctx: Annotated[int, Range(ge=1)] = 16  # learned context vectors in front of the class name
    class_specific: bool = False  # one context per class instead of one shared by all
    init: str | None = "a photo of a"  # its token embeddings start the last context vectors; None: random


@dataclass(frozen=True)
class VPTSpec(MethodConfig):
    name: str = "vpt"
    n_tokens: Annotated[int, Range(ge=1)] = 8  # learned tokens inserted into the vision sequence (shallow: input only)


class TextContext(nn.Module):
    """`backbone.text_prompts`: called as `(backbone, labels) -> [classes, dim]` normalised class text features."""

    def __init__(self, ctx: torch.Tensor, start: int, placeholder: int, max_length: int):
        super().__init__()
        self.ctx = nn.Parameter(ctx)  # [n_ctx, D] shared, or [classes, n_ctx, D] class-specific
        self.start, self.placeholder, self.max_length = start, placeholder, max_length
        self._ids: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[-2]

    def forward(self, backbone: Backbone, labels: LabelSet) -> torch.Tensor:
        ids, mask = self.token_ids(backbone, labels.names)
        if self.ctx.dim() == 3 and self.ctx.shape[0] != len(ids):
            raise ValueError(f"class-specific context was built for {self.ctx.shape[0]} classes, "
                             f"got a label set of {len(ids)}")
        embedding = backbone.tower_model("text").embeddings.token_embedding
        with _replaced_embeddings(embedding, self.ctx, self.start):
            return backbone.encode_texts(ids.to(backbone.device), mask.to(backbone.device))

    def token_ids(self, backbone: Backbone, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and attention mask of `[bos] X*n_ctx name. [eos]` per class, padded as the backbone pads."""
        key = tuple(names)
        if key not in self._ids:
            tokenizer = backbone.tokenizer
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            pad_to_max = backbone.model_type.startswith("siglip")  # SigLIP pools the last position
            rows = []
            for name in names:
                ids = tokenizer(f"{name}.")["input_ids"]
                ids = ids[:self.start] + [self.placeholder] * self.n_ctx + ids[self.start:]
                if len(ids) > self.max_length:  # cut the name, keep the final (eos) token CLIP pools at
                    ids = ids[:self.max_length - 1] + ids[-1:]
                rows.append(ids)
            length = self.max_length if pad_to_max else max(map(len, rows))
            ids = torch.tensor([row + [pad] * (length - len(row)) for row in rows])
            mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
            self._ids[key] = (ids, mask)
        return self._ids[key]


@contextlib.contextmanager
def _replaced_embeddings(embedding: nn.Module, ctx: torch.Tensor, start: int) -> Iterator[None]:
    def swap(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        context = ctx.to(output.dtype)
        if context.dim() == 2:
            context = context.expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :start], context, output[:, start + context.shape[1]:]], dim=1)

    handle = embedding.register_forward_hook(swap)
    try:
        yield
    finally:
        handle.remove()


@register
class CoOp(Method):
    name = "coop"
    Config = CoOpSpec
    quantized_bits = (4, 8)
    family_note = GENERATIVE_LATER

    def apply(self, backbone: Backbone, config: CoOpSpec, labels: LabelSet | None = None) -> None:
        freeze(backbone)
        tokenizer = backbone.tokenizer
        text = backbone.tower_model("text")
        embedding = text.embeddings.token_embedding
        max_length = text.embeddings.position_embedding.num_embeddings
        probe = tokenizer("a")["input_ids"]
        start = 1 if probe and probe[0] == tokenizer.bos_token_id else 0
        specials = len(probe) - len(tokenizer("a", add_special_tokens=False)["input_ids"])
        if config.n_ctx + specials + 1 > max_length:
            raise ValueError(f"method.n_ctx: {config.n_ctx} context vectors + {specials} special tokens leave no "
                             f"room for a class name in the text tower's {max_length} positions; use n_ctx <= "
                             f"{max_length - specials - 1}")
        placeholder = (tokenizer(PLACEHOLDER, add_special_tokens=False)["input_ids"] or [0])[0]
        dim = embedding.weight.shape[1]
        ctx = torch.randn(config.n_ctx, dim, device=embedding.weight.device) * 0.02  # CoOp's init
        if config.init:
            phrase = tokenizer(config.init, add_special_tokens=False)["input_ids"]
            if len(phrase) > config.n_ctx:
                raise ValueError(f"method.init: {config.init!r} is {len(phrase)} tokens, more than method.n_ctx: "
                                 f"{config.n_ctx}; shorten it or raise n_ctx")
            with torch.no_grad():
                ctx[config.n_ctx - len(phrase):] = embedding.weight[torch.tensor(phrase)].float()
        if config.class_specific:
            classes = len(require_labels(self.name, labels, "class_specific: true has one context per class"))
            ctx = ctx.unsqueeze(0).repeat(classes, 1, 1)
        backbone.text_prompts = TextContext(ctx.float(), start, placeholder, max_length)


class VisualTokens(nn.Module):
    """Learned tokens a forward hook inserts into the output of the vision embeddings."""

    def __init__(self, tokens: torch.Tensor, after_cls: bool):
        super().__init__()
        self.tokens = nn.Parameter(tokens)
        self.after_cls = after_cls

    def insert(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        prompts = self.tokens.to(output.dtype).expand(output.shape[0], -1, -1)
        cut = 1 if self.after_cls else 0
        return torch.cat([output[:, :cut], prompts, output[:, cut:]], dim=1)


@register
class VPT(Method):
    name = "vpt"
    Config = VPTSpec
    quantized_bits = (4, 8)
    family_note = GENERATIVE_LATER

    def apply(self, backbone: Backbone, config: VPTSpec, labels: LabelSet | None = None) -> None:
        freeze(backbone)
        embeddings = backbone.tower_model("vision").embeddings
        if hasattr(embeddings, "vpt"):
            raise ValueError("the vision embeddings already carry visual prompt tokens; apply vpt once")
        weight = embeddings.patch_embedding.weight  # [D, channels, patch, patch]
        dim, fan_in = weight.shape[0], math.prod(weight.shape[1:])
        bound = math.sqrt(6.0 / (fan_in + dim))  # VPT's uniform init, scaled like the patch projection
        tokens = torch.empty(config.n_tokens, dim, device=weight.device).uniform_(-bound, bound)
        embeddings.vpt = VisualTokens(tokens, after_cls=hasattr(embeddings, "class_embedding"))
        embeddings.register_forward_hook(embeddings.vpt.insert)
