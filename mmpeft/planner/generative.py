"""The planner's generative VLMs (LLaVA, Idefics3/SmolVLM, Qwen2-VL/2.5-VL, PaliGemma, Gemma3, ...): the model from
its config on the meta device, wrapped with its real processor, the recipe's method applied; and the step's
worst-case example, encoded by that processor.

Why the real processor: how many tokens an image becomes (fixed for LLaVA and PaliGemma, growing with the image for
Qwen2-VL, one block per crop for Idefics3 with image splitting) and how the chat template frames a question and its
answer are the processor's; its files are small and sit beside config.json, so the plan reads them instead of
re-deriving each architecture's arithmetic. The worst case: the largest image the recipe's image budget allows
(`backbone.configure(recipe)` applies that budget to the processor first) and the longest text of the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mmpeft.core.dtypes import DTYPES
from mmpeft.planner.model import MetaBackbone, PlanError, first_line, quantizable_weights

if TYPE_CHECKING:
    from PIL import Image

    from mmpeft.backbones.generative import GenerativeBackbone
    from mmpeft.data import LabelSet
    from mmpeft.data.conversations import Conversation
    from mmpeft.specs import BackboneSpec, DataSpec, Recipe

TOKENIZED_ANSWERS = 32  # the longest answers (in characters) whose tokens are counted to find the longest
UNBOUNDED_EDGE = 1024  # the image planned when neither the recipe nor the processor bounds its size


def is_generative_config(spec: BackboneSpec, config: Any) -> bool:
    """As `detect_family` decides: an explicit family, else what the config's architectures say."""
    from mmpeft.backbones import config_family

    return (spec.family if spec.family != "auto" else config_family(config)) == "generative"


def build_generative_meta(recipe: Recipe, labels: LabelSet, path: str, config: Any) -> MetaBackbone:
    """Config -> meta image-text-to-text model -> GenerativeBackbone (real processor, configured) -> method."""
    from transformers import AutoModelForImageTextToText

    from mmpeft.backbones import BackboneError
    from mmpeft.backbones.generative import GenerativeBackbone
    from mmpeft.methods import METHODS

    spec = recipe.backbone
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, dtype=DTYPES[spec.dtype],
                                                            trust_remote_code=spec.trust_remote_code)
    except (ValueError, KeyError, TypeError) as error:
        raise PlanError(f"backbone.id {spec.id!r}: family {config.model_type!r} cannot be built as an "
                        f"image-text-to-text model from its config ({first_line(error)}); the planner covers "
                        "generative VLMs that AutoModelForImageTextToText builds") from None
    quantizable = quantizable_weights(model)
    backbone = GenerativeBackbone(model, _processor(path, spec, config.model_type), path)
    backbone.configure(recipe)
    try:
        METHODS.get(recipe.method.name)().apply(backbone, recipe.method, labels)
    except BackboneError:
        raise  # the recipe's own mistake (a tower without linear layers, ...): the run says the same
    except Exception as error:  # noqa: BLE001 - a method that computes with weights while applying
        raise PlanError(f"method {recipe.method.name!r} could not be applied to {config.model_type!r} on the meta "
                        f"device ({first_line(error)}); the planner has no formula for it on generative VLMs"
                        ) from None
    backbone.train()
    return MetaBackbone(backbone, labels, quantizable)


def _processor(path: str, spec: BackboneSpec, model_type: str) -> Any:
    from transformers import AutoProcessor

    from mmpeft.backbones.image_only import image_only_processor

    try:
        processor = (image_only_processor(model_type) or AutoProcessor).from_pretrained(
            path, local_files_only=True, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception as error:  # noqa: BLE001 - any reason the files are not there or not readable
        processor, reason = None, first_line(error)
    else:
        reason = f"AutoProcessor returned {type(processor).__name__}"
    if getattr(processor, "image_processor", None) is None:
        raise PlanError(f"backbone.id {spec.id!r}: planning a generative VLM needs its processor files (tokenizer, "
                        "image processor, chat template) beside config.json, for the sequence length of a step; "
                        f"none usable found ({reason})")
    return processor


# --- the worst-case example --------------------------------------------------------------------------------------

@dataclass
class WorstCase:
    """One worst-case example as the step's model inputs (batch of 1, CPU), and how it was chosen."""

    inputs: dict[str, torch.Tensor]  # processor tensors, with `labels` on every text token
    image_edge: int  # the longest edge of the planned image (px)
    images: int  # images per example
    image_tokens: int  # tokens per image in the sequence
    notes: list[str] = field(default_factory=list)
    prompt_length: int = 0  # tokens before the answer
    answers: list[list[int]] | None = None  # train.objective classification: every class's answer ids, scored

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


def worst_case(meta: MetaBackbone, recipe: Recipe) -> WorstCase:
    """The largest image the recipe's budget allows with the data's longest text, through the real processor; the
    sequence cut at `data.max_length` when set."""
    from mmpeft.data.conversation_data import CONVERSATION_SOURCES

    backbone: GenerativeBackbone = meta.backbone
    image, image_note = worst_case_image(backbone.image_processor, recipe.data)
    if recipe.data.source in CONVERSATION_SOURCES:
        inputs, images, text_note = _longest_conversation(backbone, recipe.data, image)
        prompt = inputs["input_ids"].shape[1]
    else:
        inputs, images, text_note, prompt = _longest_answer(backbone, recipe.data, meta.labels, image)
    token = backbone.image_token_id
    tokens = int((inputs["input_ids"] == token).sum()) // max(images, 1) if token is not None and images else 0
    case = WorstCase(inputs, max(image.size), images, tokens, [image_note, text_note] if images else [text_note],
                     prompt)
    if recipe.train.objective == "classification" and recipe.data.source not in CONVERSATION_SOURCES:
        case.answers = backbone.class_text_features(meta.labels)
        case.notes.append(f"classification: each prompt ({prompt} tokens) scored against all {len(case.answers)} "
                          "class answers (a prefill, then every answer on the repeated cache), as a run trains")
    limit = recipe.data.max_length
    if limit is not None and case.length > limit:
        case.notes.append(f"sequence cut from {case.length} to data.max_length {limit} tokens")
        case.inputs = {k: v[:, :limit] if v.dim() == 2 and v.shape[1] == case.length else v
                       for k, v in inputs.items()}
        case.prompt_length = min(case.prompt_length, limit)
    context = backbone.context_length
    if context is not None and case.length > context:
        fix = ("set data.max_length or shorten them" if recipe.data.source in CONVERSATION_SOURCES else
               "shorten data.question or the answers")
        case.notes.append(f"the worst-case sequence ({case.length} tokens) exceeds the language model's context "
                          f"length ({context}): it cannot train on such rows; {fix}")
    return case


def worst_case_image(image_processor: Any, data: DataSpec) -> tuple[Image.Image, str]:
    """A blank image as large as the budget allows: a square of `data.max_pixels`, `data.max_image_edge` square,
    else the processor's own largest size, else UNBOUNDED_EDGE square; and a note saying which."""
    from PIL import Image

    max_pixels, max_edge = data.max_pixels, data.max_image_edge
    if max_pixels is not None:
        edge, why = math.isqrt(int(max_pixels)), f"a square of data.max_pixels {max_pixels:,}"
    elif max_edge is not None:
        edge, why = int(max_edge), "data.max_image_edge"
    else:
        edge, why = processor_edge(image_processor)
    return Image.new("RGB", (edge, edge)), f"images planned at {edge}x{edge} px ({why})"


def processor_edge(image_processor: Any) -> tuple[int, str]:
    """The longest image edge the processor passes on (it resizes anything larger), and where that comes from."""
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "merge_size", None) is not None:  # Qwen2-VL-style: a pixel budget
        pixels = getattr(image_processor, "max_pixels", None) or _size(size, "max_pixels") \
            or _size(size, "longest_edge")
        if pixels:
            return math.isqrt(int(pixels)), f"a square of the processor's max_pixels {int(pixels):,}"
    for key in ("longest_edge", "height", "width", "shortest_edge"):
        if _size(size, key):
            edges = [_size(size, k) or 0 for k in ("longest_edge", "height", "width", "shortest_edge")]
            return int(max(edges)), "the processor's own image size: it resizes larger images to it"
    return UNBOUNDED_EDGE, (f"no image budget in the recipe (data.max_pixels / data.max_image_edge) or the "
                            f"processor: a {UNBOUNDED_EDGE} px square assumed")


def _size(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if isinstance(value, (int, float)) and value else None


def _longest_answer(backbone: GenerativeBackbone, data: DataSpec, labels: LabelSet, image: Image.Image,
                    ) -> tuple[dict[str, torch.Tensor], int, str, int]:
    """Label data: one image, the longest question (data.question or a row's own prompt) and the longest answer
    (a class name through data.answer_template, or a row's own text)."""
    from mmpeft.data import read_rows

    rows = read_rows(data).rows
    questions = [data.question] + [row.prompt for row in rows if row.prompt]
    answers = [data.answer_template.format(label=name) for name in labels.names] + [row.text for row in rows
                                                                                     if row.text]
    longest = sorted(dict.fromkeys(answers), key=len, reverse=True)[:TOKENIZED_ANSWERS]  # not all of a table
    answer = max(longest, key=lambda text: len(backbone.answer_ids(text)))
    question = max(questions, key=len)
    prompt = backbone.encode_one(backbone.prompt_text(question), [image])
    encoded = backbone.with_answer(prompt, backbone.answer_ids(answer))
    return (encoded, 1, f"text: the longest question ({len(question)} characters) with the longest answer "
            f"{answer!r}", int(prompt["input_ids"].shape[1]))


def _longest_conversation(backbone: GenerativeBackbone, data: DataSpec, image: Image.Image,
                          ) -> tuple[dict[str, torch.Tensor], int, str]:
    """Conversation data: the row with the longest text and the row with the most images, each with planned-size
    images through the chat template; the longer sequence is planned."""
    from mmpeft.data.conversation_data import read_source

    rows = [row for row in read_source(data)[0] if not row.problems]
    if not rows:
        raise PlanError(f"data.path {data.path!r}: no readable conversation rows to measure a sequence from")
    longest = max(rows, key=lambda row: sum(len(turn.text) for turn in row.turns))
    most = max(rows, key=lambda row: len(row.images))
    candidates = [longest] if most is longest else [longest, most]
    encoded = [(_encode_conversation(backbone, row, image), row) for row in candidates]
    inputs, row = max(encoded, key=lambda pair: pair[0]["input_ids"].shape[1])
    return inputs, len(row.images), (f"text: the longest of {len(rows)} conversation(s) ({row.source}, "
                                     f"{len(row.turns)} turns, {len(row.images)} images)")


def _encode_conversation(backbone: GenerativeBackbone, row: Conversation, image: Image.Image,
                         ) -> dict[str, torch.Tensor]:
    from mmpeft.data.conversations import chat_messages

    inputs = dict(backbone.encode_one(backbone.render(chat_messages(row.turns)), [image] * len(row.images)))
    inputs["labels"] = inputs["input_ids"].clone()
    return inputs
