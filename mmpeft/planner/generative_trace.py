"""Activations of a generative VLM's training step, traced on the meta device in two parts.

A whole VLM forward does data-dependent things that meta tensors cannot (LLaVA checks how many image tokens the
ids hold, Idefics3 drops all-zero crops with a boolean index, Qwen2-VL loops over `grid_thw.tolist()`), so the trace
runs what those checks guard instead:
- the language model on `inputs_embeds` [batch, sequence, hidden], then the LM head and the causal-LM loss with
  labels on every position: where LoRA on the language model keeps its activations;
- the vision tower and projector (`get_image_features`) on the step's pixel inputs, when a parameter there trains:
  their output is scattered into the embeddings as the model does, so the language model's backward reaches them.
  A frozen tower in front of nothing trainable keeps nothing for backward; its forward is bounded by its largest
  tensor, counted as workspace per example.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from mmpeft.planner.model import PlanError, first_line
from mmpeft.planner.trace import ActivationTrace, trace_run

if TYPE_CHECKING:
    from torch import nn

    from mmpeft.planner.generative import WorstCase
    from mmpeft.planner.model import MetaBackbone

PLANNED_FAMILIES = "LLaVA, Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL, PaliGemma, Gemma3 (tested on their tiny builds)"
VISION_LAYERS = re.compile(r"(.*\.)?(vision_tower|vision_model|visual)(\.vision_model)?\.(encoder\.layers|blocks)\.\d+")


@dataclass
class GenerativeTrace:
    """The traces at `batch` and `batch + 1`, one example's input and vision-forward bytes, and what was traced."""

    at: ActivationTrace
    next: ActivationTrace
    per_example: int  # the example's input tensors plus the frozen vision forward's largest tensor
    notes: list[str] = field(default_factory=list)


def trace_generative(meta: MetaBackbone, case: WorstCase, batch: int, autocast: torch.dtype | None,
                     ) -> GenerativeTrace:
    backbone = meta.backbone
    base = backbone.base_model
    language = re.compile(backbone.tower_pattern("language"))
    vision_trains = [name for name, p in backbone.model.named_parameters()
                     if p.requires_grad and not language.search(name)]
    notes = []
    images = case.images > 0 and any(key.startswith("pixel") for key in case.inputs)
    vision = images and bool(vision_trains)
    if vision:
        try:
            with torch.no_grad():
                image_features(base, case, 1)
        except Exception as error:  # noqa: BLE001 - a family whose vision forward needs data (see the docstring)
            vision = False
            notes.append(f"the trainable vision tower / projector of {base.config.model_type} cannot run on meta "
                         f"tensors ({first_line(error)}): its activations are not in the plan (traced: the "
                         "language model and loss only)")
    if vision:
        notes.append("traced on meta tensors: vision tower and projector on the step's pixels, language model on "
                     "the merged embeddings, LM head and loss")
    elif not notes:
        vision_note = "the frozen vision tower keeps nothing for backward" if images else "no images: the " \
            "vision tower does not run"
        notes.append("traced on meta tensors: the language model on [batch, sequence, hidden] embeddings, LM head "
                     f"and loss; {vision_note}")
    transient = _vision_transient(base, case) if images and not vision_trains else 0
    if transient is None:
        transient = 0
        notes.append(f"the vision forward of {base.config.model_type} cannot run on meta tensors: its transient "
                     "buffers are not in the workspace")
    inputs = sum(v.numel() * (_model_dtype(base).itemsize if v.is_floating_point() else v.element_size())
                 for v in case.inputs.values())
    try:
        at, following = (_trace_at(meta, case, b, autocast, vision) for b in (batch, batch + 1))
    except Exception as error:  # noqa: BLE001 - a family whose language model needs data on meta tensors
        raise PlanError(f"backbone.id {backbone.name_or_path!r}: family {base.config.model_type!r}: its language "
                        f"model cannot be traced on meta tensors ({first_line(error)}); planned families: "
                        f"{PLANNED_FAMILIES}") from None
    return GenerativeTrace(at, following, inputs + transient, notes)


def _trace_at(meta: MetaBackbone, case: WorstCase, batch: int, autocast: torch.dtype | None,
              vision: bool) -> ActivationTrace:
    base = meta.backbone.base_model
    lm = base.get_decoder()
    layers = [(f"language.{i}", layer) for i, layer in enumerate(lm.layers)]
    layers += [(f"vision.{name.rsplit('.', 1)[-1]}", module) for name, module in base.named_modules()
               if VISION_LAYERS.fullmatch(name)] if vision else []
    config = base.config.get_text_config()
    length = case.length if case.answers is None else case.prompt_length
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")

    def step() -> torch.Tensor:
        embeds = lm.get_input_embeddings()(ids)
        if vision:
            features = image_features(base, case, batch).to(embeds.dtype)
            mask = torch.zeros(batch, length, 1, dtype=torch.bool, device="meta").expand_as(embeds)
            embeds = embeds.masked_scatter(mask, features)
        output = lm(inputs_embeds=embeds)  # with a cache: no packed-sequence check (which reads data)
        logits = base.lm_head(output.last_hidden_state)
        if case.answers is None:
            return base.loss_function(logits=logits, labels=ids, vocab_size=config.vocab_size)
        cache = getattr(output, "cache", None) or output.past_key_values
        return _scored(lm, base.lm_head, logits, cache, case.answers, batch)

    return trace_run(meta.backbone, layers, step, autocast)


def _scored(lm: nn.Module, head: nn.Module, logits: torch.Tensor, cache: Any, answers: list[list[int]],
            batch: int) -> torch.Tensor:
    """train.objective classification, as `score_answers` trains it: the prefill's last position predicts every
    answer's first token; all answers continue on the cache repeated per class; cross-entropy over the scores."""
    count, longest = len(answers), max(len(answer) for answer in answers)
    ids = torch.zeros(batch * count, longest, dtype=torch.long, device="meta")
    scores = logits[:, -1].float().log_softmax(-1)[:, :count]
    if longest > 1:
        cache.batch_repeat_interleave(count)
        argument = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        rest = head(lm(input_ids=ids, use_cache=False, **{argument: cache}).last_hidden_state)
        tokens = rest[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        scores = scores + tokens.sum(1).view(batch, count)
    return F.cross_entropy(scores, torch.zeros(batch, dtype=torch.long, device="meta"))


def image_features(base: nn.Module, case: WorstCase, batch: int) -> torch.Tensor:
    """[image tokens, hidden]: `get_image_features` on meta copies of `batch` examples' pixel inputs."""
    from mmpeft.backbones.conversations import SEQUENCE_KEYS

    get = base.model.get_image_features
    accepted = inspect.signature(get).parameters
    inputs = {}
    for key, value in case.inputs.items():
        if key in SEQUENCE_KEYS or key not in accepted:
            continue
        if value.is_floating_point():
            inputs[key] = torch.empty((value.shape[0] * batch, *value.shape[1:]), dtype=_model_dtype(base),
                                      device="meta")
        else:  # grids and masks stay real: the tower reads their values (Qwen2-VL's grid_thw)
            inputs[key] = torch.cat([value] * batch)
    if base.config.model_type in FEATURES_ON_META:
        return FEATURES_ON_META[base.config.model_type](base.model, inputs)
    with _OnMeta():
        output = get(**inputs)
    pooled = getattr(output, "pooler_output", output)
    if isinstance(pooled, (list, tuple)):
        pooled = torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])
    return pooled.reshape(-1, pooled.shape[-1])


def _idefics3_features(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Idefics3's `get_image_features` without what reads data (dropping all-zero crops, positions from the patch
    mask): every crop of the worst case is a real, unpadded one, so its mask is all ones and the attention runs
    unmasked, as the real tower runs it. Frozen patch and position embeddings keep nothing for backward."""
    pixels = inputs["pixel_values"]
    pixels = pixels.view(-1, *pixels.shape[-3:])
    vision = model.vision_model
    embeds = vision.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    embeds = embeds + vision.embeddings.position_embedding(torch.zeros(embeds.shape[:2], dtype=torch.long,
                                                                       device=embeds.device))
    hidden = vision.post_layernorm(vision.encoder(inputs_embeds=embeds).last_hidden_state)
    features = model.connector(hidden)
    return features.reshape(-1, features.shape[-1])


FEATURES_ON_META = {"idefics3": _idefics3_features}


class _OnMeta(TorchFunctionMode):
    """An op mixing meta and real tensors runs on meta: what the tower derives from a real grid (position ids,
    rotary angles) meets the meta activations there."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if any(t.is_meta for t in tensors) and any(not t.is_meta and t.dim() for t in tensors):
            args, kwargs = tree_map(_to_meta, args), tree_map(_to_meta, kwargs)
        return func(*args, **kwargs)


def _to_meta(value: object) -> object:
    return value.to("meta") if isinstance(value, torch.Tensor) and not value.is_meta else value


def _vision_transient(base: nn.Module, case: WorstCase) -> int | None:
    """The largest tensor a frozen vision forward of one example makes (its transient peak), None where the
    forward cannot run on meta tensors."""
    largest = [0]

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        for value in output if isinstance(output, (tuple, list)) else [getattr(output, "last_hidden_state", output)]:
            if isinstance(value, torch.Tensor):
                largest[0] = max(largest[0], value.numel() * value.element_size())

    handles = [module.register_forward_hook(record) for name, module in base.model.named_modules()
               if name and not name.startswith(("language_model", "text_model"))]
    try:
        with torch.no_grad():
            image_features(base, case, 1)
    except Exception:  # noqa: BLE001 - data-dependent on meta (see the docstring)
        return None
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]


def _model_dtype(base: nn.Module) -> torch.dtype:
    return getattr(base, "dtype", torch.float32)
