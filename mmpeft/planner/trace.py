"""Activation memory of one training step, traced on the meta device: what autograd keeps for backward, exactly.

Why trace instead of a formula: what a step keeps depends on the method as much as on the model. A frozen linear
layer keeps no input (its weight needs no gradient), a LoRA branch keeps its own small inputs, a frozen tower in
front of every trainable parameter keeps nothing, prompt tokens lengthen the sequence, mixed precision keeps
half-precision copies. Running the real forward on meta tensors under `torch.autograd.graph.saved_tensors_hooks`
sees every tensor autograd saves, with its true shape and dtype, and allocates nothing.

Two things differ between meta tensors and a GPU, and are emulated here:
- SDPA: on meta, `scaled_dot_product_attention` falls back to the math path, which keeps the [heads, T, T]
  attention matrix; the fused kernels a GPU (and torch's CPU flash kernel) use keep q, k, v, the output and one
  log-sum-exp per query. The trace swaps in a stand-in that keeps exactly those.
- autocast (`train.mixed_precision`): it does not exist for meta tensors; a function mode casts the inputs of
  matmuls and convolutions to half precision and of norms, softmax and losses to float32, as autocast's op lists do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from torch import nn

    from mmpeft.backbones import Backbone
    from mmpeft.planner.model import MetaBackbone

OUTSIDE = "outside encoder layers"


@dataclass
class StepShape:
    """The inputs of one step: images per batch, and the texts the text tower encodes in it."""

    batch: int
    image_size: int
    channels: int
    text_rows: int  # class prompts (classification) or one caption per example (contrastive)
    text_length: int
    contrastive: bool = False


@dataclass
class ActivationTrace:
    """Bytes autograd keeps for backward, attributed to encoder layers (for gradient checkpointing) or outside them."""

    per_layer: dict[str, int] = field(default_factory=dict)
    layer_inputs: dict[str, int] = field(default_factory=dict)  # bytes of each layer's input hidden states
    outside: int = 0
    largest: int = 0  # the largest single kept tensor: a measure of backward's transient buffers

    @property
    def total(self) -> int:
        return self.outside + sum(self.per_layer.values())

    def checkpointed(self) -> int:
        """With per-layer checkpointing: layer inputs on the gradient path, plus one layer recomputed in backward."""
        on_path = [key for key, size in self.per_layer.items() if size]
        recompute = max((self.per_layer[key] for key in on_path), default=0)
        return self.outside + sum(self.layer_inputs.get(key, 0) for key in on_path) + recompute


def trace_step(meta: MetaBackbone, shape: StepShape, autocast: torch.dtype | None = None) -> ActivationTrace:
    """Run the step's forward and loss on meta tensors and record every tensor saved for backward."""
    return trace_run(meta.backbone, encoder_layers(meta.backbone), lambda: _loss(meta, shape), autocast)


def trace_run(module: nn.Module, layers: list[tuple[str, nn.Module]], run: Callable[[], object],
              autocast: torch.dtype | None = None) -> ActivationTrace:
    """Call `run` (a forward and loss on meta tensors through `module`) and record every tensor saved for backward,
    attributed to `layers` (name, layer) where one of them is running."""
    trace = ActivationTrace()
    params = {p.untyped_storage()._cdata for p in module.parameters()}
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # holds saved tensors so storage ids stay unique during the trace
    where: list[str] = [OUTSIDE]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in params and key not in seen:
            seen.add(key)
            keep.append(tensor)
            size = storage.nbytes()
            trace.largest = max(trace.largest, size)
            if where[-1] == OUTSIDE:
                trace.outside += size
            else:
                trace.per_layer[where[-1]] += size
        return tensor

    with contextlib.ExitStack() as stack:
        for name, layer in layers:
            trace.per_layer[name] = 0
            stack.enter_context(_attributed(layer, name, where, trace))
        stack.enter_context(_fused_attention())
        if autocast is not None:
            stack.enter_context(_MetaAutocast(autocast))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor))
        run()
    return trace


def encoder_layers(backbone: Backbone) -> list[tuple[str, nn.Module]]:
    """(tower.index, layer) for every encoder layer the backbone exposes."""
    layers = []
    for tower in ("vision", "text"):
        try:
            layers += [(f"{tower}.{i}", layer) for i, layer in enumerate(backbone.encoder_layers(tower))]
        except Exception:  # noqa: BLE001 - a backbone without this tower's layers: its memory counts as outside
            continue
    return layers


def _loss(meta: MetaBackbone, shape: StepShape) -> torch.Tensor:
    """The objective's loss on meta inputs: image-vs-class-text cross-entropy, or CLIP-style contrastive."""
    backbone = meta.backbone
    pixels = torch.empty(shape.batch, shape.channels, shape.image_size, shape.image_size, device="meta")
    if backbone.text_prompts is not None and not shape.contrastive:
        text = _without_padding_mask(backbone, lambda: backbone.class_text_features(meta.labels))
    elif backbone.head is not None:
        text = None
    else:
        ids = torch.zeros(shape.text_rows, shape.text_length, dtype=torch.long, device="meta")
        text = backbone.encode_texts(ids)  # no padding mask: reading one needs data (its [T, T] mask is small)
    if shape.contrastive:
        if text is None:
            raise ValueError("train.objective: 'contrastive' trains image-text similarity, but this method scores "
                             "images with a linear head; use train.objective: classification")
        logits = backbone.encode_images(pixels) @ text.t()
        target = torch.zeros(shape.batch, dtype=torch.long, device="meta")
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    logits = backbone.classify(pixels, text)
    return F.cross_entropy(logits, torch.zeros(shape.batch, dtype=torch.long, device="meta"))


def _without_padding_mask(backbone: nn.Module, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Prompt learners pass a padding mask; checking one on meta tensors needs data, so the trace drops it."""
    encode = backbone.encode_texts
    backbone.encode_texts = lambda input_ids, attention_mask=None: encode(input_ids)
    try:
        return run()
    finally:
        del backbone.encode_texts


@contextlib.contextmanager
def _attributed(layer: nn.Module, name: str, where: list[str], trace: ActivationTrace) -> Iterator[None]:
    """While `layer` runs, saved tensors count as its own; its input hidden states are recorded for checkpointing."""

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            trace.layer_inputs[name] = hidden.numel() * hidden.element_size()
        where.append(name)

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        where.pop()

    handles = [layer.register_forward_pre_hook(enter, with_kwargs=True), layer.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _FusedAttention(torch.autograd.Function):
    """Keeps what flash / memory-efficient attention keep: q, k, v, output, one log-sum-exp per query (and mask)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # [batch, heads, T, d] viewed from [batch, T, heads, d], the layout the fused kernels return: the reshape
        # before the output projection is then a view, not a copy
        out = q.new_empty(*q.shape[:-3], q.shape[-2], q.shape[-3], v.shape[-1]).transpose(-3, -2)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if isinstance(mask, torch.Tensor) else []))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> None:
        raise RuntimeError("the planner's attention stand-in only traces memory")


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
          *args: object, **kwargs: object) -> torch.Tensor:
    return _FusedAttention.apply(query, key, value, attn_mask)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class _MetaAutocast(TorchFunctionMode):
    """autocast's casting rules for the ops dual encoders use, on meta tensors (where real autocast does not run)."""

    LOW = {F.linear, F.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm,
           torch.baddbmm, torch.addmm}
    FLOAT32 = {F.layer_norm, F.softmax, F.log_softmax, F.cross_entropy, F.normalize, torch.Tensor.softmax,
               F.logsigmoid, torch.Tensor.exp, torch.exp}

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self.dtype if func in self.LOW else torch.float32 if func in self.FLOAT32 else None
        if target is not None:
            args = tuple(_cast(a, target) for a in args)
            kwargs = {k: _cast(v, target) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _cast(value: object, dtype: torch.dtype) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value
