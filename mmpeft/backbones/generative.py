"""Generative VLMs (image-text-to-text: LLaVA, Idefics3/SmolVLM, Qwen2-VL, ...): any model that
`AutoModelForImageTextToText` + `AutoProcessor` load, from a hub id or a local folder.

Why one class for all of them: what differs between architectures is the prompt format (owned by the processor's
chat template), how many tokens an image becomes (owned by the processor) and module names (the tower patterns
below). Everything else (answer-masked training inputs, label scoring, generation) is the same code path.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from mmpeft.backbones.base import BACKBONES, Backbone, BackboneError
from mmpeft.backbones.conversations import IGNORE_INDEX, SEQUENCE_KEYS, ConversationInputs
from mmpeft.backbones.encoded_cache import EncodedCache, encoded_key
from mmpeft.backbones.generative_task import GenerativeTask, ImageBudget
from mmpeft.backbones.image_only import register as register_image_only_processors
from mmpeft.backbones.loading import load_pretrained
from mmpeft.backbones.scoring import score_answers
from mmpeft.data.images import to_rgb

if TYPE_CHECKING:
    from PIL import Image

    from mmpeft.data import LabelSet
    from mmpeft.specs import BackboneSpec, DataSpec, Recipe

register_image_only_processors()  # before any AutoProcessor call, or a Qwen2-VL folder loads as a bare tokenizer

# LoRA targets per tower, as peft regexes on module names (full match, with or without a peft prefix). Each names
# linear layers only: LLaVA (language_model, vision_tower, multi_modal_projector), Idefics3/SmolVLM (text_model,
# vision_model, connector), Qwen2-VL/2.5-VL (language_model, visual blocks, visual.merger).
TOWER_PATTERNS = {
    "language": r"(language_model|text_model)(\.model)?\.layers\.\d+\."
                r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
    "vision": r"(vision_tower|vision_model|visual)(\.vision_model)?\.(encoder\.layers|blocks)\.\d+\."
              r"(self_attn|attn)\.(q_proj|k_proj|v_proj|out_proj|qkv|proj)",
    "projector": r"(multi_modal_projector\.linear(_\d+)?|connector\.modality_projection\.proj|merger\.mlp\.(0|2)"
                 r"|mm_projector\.\d+)",
}
DEFAULT_TOWERS = ("language",)
# Parameter-name patterns of whole towers (for methods that unfreeze parameters, e.g. full fine-tuning).
TOWER_PARAMETERS = {
    "language": r"(language_model|text_model|lm_head)",
    "vision": r"(vision_tower|vision_model|visual(?!\.merger))",
    "projector": r"(multi_modal_projector|connector|merger|mm_projector)",
}


@BACKBONES.register("generative")
class GenerativeBackbone(ConversationInputs, Backbone):
    """Wraps an image-text-to-text model; methods may replace `.model` (peft). `head` is always None here."""

    family = "generative"
    leaves_parameters_unused = True
    TOWER_PATTERNS = TOWER_PATTERNS
    DEFAULT_TOWERS = DEFAULT_TOWERS

    @classmethod
    def load(cls, spec: BackboneSpec, path: str) -> GenerativeBackbone:
        from transformers import AutoModelForImageTextToText

        model, processor = load_pretrained(AutoModelForImageTextToText, spec, path)
        if getattr(processor, "image_processor", None) is None:
            raise BackboneError(f"backbone.id {spec.id!r}: AutoProcessor returned {type(processor).__name__}, not a "
                                "processor with an image processor; if its processor class is a custom one, import "
                                "the module that registers it with AutoProcessor.register before loading")
        if not is_generative(model):
            raise BackboneError(f"backbone.id {spec.id!r}: {type(model).__name__} cannot generate from images; "
                                "try backbone.family: dual_encoder")
        return cls(model, processor, path)

    def __init__(self, model: nn.Module, processor, name_or_path: str):
        super().__init__(model, processor, name_or_path)
        self.task = GenerativeTask()
        self._answer_ids: dict[str, list[int]] = {}
        self.encoded = EncodedCache()  # processor outputs per (prompt, images): not re-run every epoch
        self.stock_image_size = getattr(self.image_processor, "size", None)  # what a budget starts from

    def configure(self, recipe: Recipe) -> None:
        """Take the question, answer template and scoring/generation settings from the recipe."""
        data = recipe.data
        self.apply_task_settings(dataclasses.asdict(GenerativeTask(
            data.question, data.answer_template, recipe.eval.length_normalize, recipe.eval.max_new_tokens,
            data.max_pixels, data.min_pixels, data.max_image_edge, data.max_length)))

    def task_settings(self) -> dict:
        """The task as an export carries it (budget keys only when set)."""
        return {key: value for key, value in dataclasses.asdict(self.task).items() if value is not None}

    def apply_task_settings(self, settings: dict) -> None:
        self.task = GenerativeTask(**settings)
        if self.stock_image_size is not None:
            self.image_processor.size = self.stock_image_size
        self.task.budget.apply(self.image_processor, self.name_or_path)

    # --- parts --------------------------------------------------------------------------------------------------
    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def context_length(self) -> int | None:
        """The language model's maximum sequence length, when its config says."""
        config = self.base_model.config
        text = getattr(config, "text_config", config)
        return getattr(text, "max_position_embeddings", None)

    def preprocess(self, images: list[Image.Image]) -> list[Image.Image]:
        """Images stay PIL images in batches: the processor reads them together with the prompt text, because the
        number of image tokens it writes into the text depends on the image."""
        return [to_rgb(image) for image in images]

    # --- prompts ------------------------------------------------------------------------------------------------
    @staticmethod
    def user_turn(question: str, images: int = 1) -> dict:
        return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}

    @staticmethod
    def answer_turn(answer: str) -> dict:
        return {"role": "assistant", "content": [{"type": "text", "text": answer}]}

    def conversation(self, question: str, demos: list[tuple[str, str]] = ()) -> list[dict]:
        """In-context demonstrations as earlier turns (user: image + question, assistant: answer), the query last."""
        messages = []
        for demo_question, demo_answer in demos:
            messages += [self.user_turn(demo_question), self.answer_turn(demo_answer)]
        return messages + [self.user_turn(question)]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Text of a conversation through the model's own chat template (processor's, else tokenizer's)."""
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if not getattr(owner, "chat_template", None):
            raise BackboneError(f"backbone.id {self.name_or_path!r}: the processor has no chat template, so prompts "
                                "cannot be built; save one with the processor (chat_template.jinja)")
        return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def prompt_text(self, question: str, demos: list[tuple[str, str]] = ()) -> str:
        return self.render(self.conversation(question, demos), add_generation_prompt=True)

    def answer_ids(self, answer: str) -> list[int]:
        """Tokens the model must produce to give `answer`: the answer and the template's end-of-turn marker.

        Taken from the chat template (a conversation with the answer minus the same one ending in the generation
        prompt) and tokenized on its own, so no token straddles prompt and answer and every label is scored on the
        identical prompt tokens. Trailing whitespace after the end-of-turn marker is not part of the answer.
        """
        if answer not in self._answer_ids:
            messages = [self.user_turn("?")]
            prompt = self.render(messages, add_generation_prompt=True)
            full = self.render(messages + [self.answer_turn(answer)])
            if not full.startswith(prompt) or answer not in full[len(prompt):]:
                raise BackboneError(f"backbone.id {self.name_or_path!r}: its chat template does not write the answer "
                                    f"right after the generation prompt ({full[-80:]!r}), so answers cannot be scored")
            ids = self.tokenizer(full[len(prompt):].rstrip(), add_special_tokens=False)["input_ids"]
            self._answer_ids[answer] = list(ids)
        return self._answer_ids[answer]

    def class_text_features(self, labels: LabelSet) -> list[list[int]]:
        """The answer tokens of each class: what classification scores, as dual encoders score label texts."""
        return [self.answer_ids(self.task.answer_template.format(label=name)) for name in labels.names]

    def references(self, batch: dict, labels: LabelSet) -> list[str]:
        """What each example should answer: its own text (`data.text_column`), else the templated label name."""
        own = batch.get("texts") or [None] * len(batch["labels"])
        names = labels.names
        return [text if text else self.task.answer_template.format(label=names[int(label)])
                for text, label in zip(own, batch["labels"].tolist())]

    def questions(self, batch: dict) -> list[str]:
        """Each example's own prompt (`data.prompt_column`) or the recipe's `data.question`."""
        own = batch.get("prompts") or [None] * len(batch["pixel_values"])
        return [text or self.task.question for text in own]

    # --- inputs -------------------------------------------------------------------------------------------------
    def encode_one(self, text: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """One rendered prompt and its images (in order of appearance) -> processor tensors (batch of 1, on CPU).

        Cached per (prompt, images' pixels): the same example is not put through the processor every epoch."""
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))

        budget = self.task.budget

        def run_processor() -> dict[str, torch.Tensor]:
            fitted = [budget.fit(image) for image in images]
            return dict(self.processor(text=[text], images=fitted or None, return_tensors="pt",
                                       add_special_tokens=special))

        return self.encoded.get_or_make(encoded_key(text, list(images), f"{special}:{budget.key}"), run_processor)

    def with_answer(self, encoded: dict[str, torch.Tensor], answer: list[int]) -> dict[str, torch.Tensor]:
        """Append answer tokens; `labels` are IGNORE_INDEX on every prompt token and the answer ids after it."""
        ids = torch.tensor([answer], dtype=encoded["input_ids"].dtype)
        out = dict(encoded)
        out["input_ids"] = torch.cat([encoded["input_ids"], ids], 1)
        out["labels"] = torch.cat([torch.full_like(encoded["input_ids"], IGNORE_INDEX), ids], 1)
        if "attention_mask" in encoded:
            out["attention_mask"] = torch.cat([encoded["attention_mask"], torch.ones_like(ids)], 1)
        for key in ("mm_token_type_ids", "token_type_ids"):  # answer tokens are text (PaliGemma: its suffix, 1)
            if key in encoded:
                value = 1 if key == "token_type_ids" and self.model_type == "paligemma" else 0
                out[key] = torch.cat([encoded[key], torch.full_like(ids, value, dtype=encoded[key].dtype)], 1)
        return out

    def stack(self, parts: list[dict[str, torch.Tensor]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Batch per-example encodings: sequences padded (pad id, mask 0, label ignored), image tensors concatenated.

        Image tensors that differ beyond the batch dimension (Idefics3 with image splitting: one image is 1 + 4
        crops, a wide one 1 + 2) are zero-padded to the largest, as the processor pads a batch itself: the model
        drops all-zero crops, and their pixel attention mask is 0.
        """
        length = max(part["input_ids"].shape[1] for part in parts)
        pad = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        batch = {}
        for key in parts[0]:
            values = [part[key] for part in parts]
            if key in SEQUENCE_KEYS:
                filled = []
                for value in values:
                    extra = torch.full((1, length - value.shape[1]), pad.get(key, 0), dtype=value.dtype)
                    filled.append(torch.cat([value, extra] if padding_side == "right" else [extra, value], 1))
                batch[key] = torch.cat(filled)
            else:
                batch[key] = _zero_padded_cat(values)
        return batch

    def to_model(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs on the model's device; floating image tensors in the model's dtype."""
        dtype = getattr(self.base_model, "dtype", torch.float32)
        return {k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device) for k, v in inputs.items()}

    def encode(self, texts: list[str], images: list[list[Image.Image]], answers: list[list[int]] | None = None,
               padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Model inputs for rendered prompts, each with its own images; with `answers`, also masked `labels`."""
        parts = [self.encode_one(text, imgs) for text, imgs in zip(texts, images)]
        if answers is not None:
            parts = [self.with_answer(part, answer) for part, answer in zip(parts, answers)]
        return self.to_model(self.stack(parts, padding_side))

    # --- evaluation hooks (mmpeft.evaluation.predict) -----------------------------------------------------------
    def logits(self, batch: dict, answers: list[list[int]]) -> torch.Tensor:
        """[batch, classes] log-likelihood of each class's answer given the image and its question."""
        texts = [self.prompt_text(question) for question in self.questions(batch)]
        images = [[image] for image in batch["pixel_values"]]
        return score_answers(self, texts, images, answers, length_normalize=self.task.length_normalize)

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """[N, D] normalised: the mean of each image's visual tokens as the language model receives them (vision
        tower + projector), used to pick nearest-neighbour demonstrations.

        Each image goes through the image processor on its own (a flat list is one sample with N images to
        Idefics3's processor); images whose tensors have the same shapes are then batched, and the features the model
        returns for a batch (one row per image, per crop, or per visual token) are split evenly per image.
        """
        get_features = self.base_model.get_image_features
        accepted = inspect.signature(get_features).parameters
        encoded = []
        for image in self.preprocess(images):
            pixels = self.image_processor(images=[image], return_tensors="pt")
            encoded.append({k: v for k, v in pixels.items() if k in accepted and torch.is_tensor(v)})
        groups: dict[tuple, list[int]] = {}
        for index, inputs in enumerate(encoded):
            groups.setdefault(tuple((k, tuple(v.shape)) for k, v in sorted(inputs.items())), []).append(index)
        vectors: list[torch.Tensor | None] = [None] * len(images)
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                inputs = {key: torch.cat([encoded[i][key] for i in chunk]) for key in encoded[chunk[0]]}
                for index, vector in zip(chunk, _mean_per_image(get_features(**self.to_model(inputs)), len(chunk))):
                    vectors[index] = vector
        return nn.functional.normalize(torch.stack(vectors), dim=-1)

    # --- for methods --------------------------------------------------------------------------------------------
    def tower_pattern(self, tower: str) -> str:
        """A regex that finds a tower's parameters by name ("text" means the language model, as for dual encoders)."""
        return TOWER_PARAMETERS["language" if tower == "text" else tower]

    def default_lora_targets(self, towers: tuple[str, ...]) -> str:
        """A peft `target_modules` regex: the linear layers of the chosen towers (language: attention and MLP of every
        decoder layer; vision: attention of every encoder block; projector: its linear layers)."""
        problems = lora_tower_problems(self.model, towers)
        if problems:
            raise BackboneError("; ".join(problems))
        return rf".*({'|'.join(TOWER_PATTERNS[t] for t in towers)})"

    @classmethod
    def recipe_tower_problems(cls, spec: BackboneSpec, towers: tuple[str, ...]) -> list[str]:
        """`lora_tower_problems` before any weight loads: the architecture built from config.json on the meta device.

        Nothing to say (the load reports it) when the config cannot be read here (a hub id offline) or is not an
        image-text-to-text model; demo names are not built for a check.
        """
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForImageTextToText

        if spec.id.startswith("mmpeft-demo/"):
            return []
        try:
            remote = spec.trust_remote_code
            config = AutoConfig.from_pretrained(spec.id, revision=spec.revision, trust_remote_code=remote)
            with init_empty_weights():
                model = AutoModelForImageTextToText.from_config(config, trust_remote_code=remote)
        except (OSError, ValueError, KeyError):
            return []
        return lora_tower_problems(model, towers)

    @classmethod
    def recipe_budget_problems(cls, spec: BackboneSpec, data: DataSpec) -> list[str]:
        """The image budget tried on the folder's image processor (a small file) before any weight loads; nothing to
        say when it cannot be read here (the load reports it)."""
        from transformers import AutoImageProcessor

        if spec.id.startswith("mmpeft-demo/"):
            return []
        try:
            processor = AutoImageProcessor.from_pretrained(spec.id, revision=spec.revision,
                                                           trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError, KeyError):
            return []
        try:
            ImageBudget(data.max_pixels, data.min_pixels, data.max_image_edge).apply(processor, spec.id)
        except BackboneError as error:
            return [str(error)]
        return []


def lora_tower_problems(model: nn.Module, towers: tuple[str, ...]) -> list[str]:
    """Why each of `towers` has no linear layer LoRA can wrap in `model` (Gemma3's projector is a bare weight)."""
    names = [name for name, module in model.named_modules() if _is_linear(module)]
    problems = []
    for tower in towers:
        if tower not in TOWER_PATTERNS:
            problems.append(f"method.towers: {tower!r} is not a tower of generative backbones; towers: "
                            f"{', '.join(TOWER_PATTERNS)}, all")
            continue
        pattern = re.compile(rf".*{TOWER_PATTERNS[tower]}")
        if any(pattern.fullmatch(name) for name in names):
            continue
        owned = re.compile(TOWER_PARAMETERS[tower])
        bare = [name for name, _ in model.named_parameters() if owned.search(name)]
        why = (f"its parameters there ({', '.join(bare[:3])}) are not linear layers, so LoRA cannot wrap them; leave "
               f"{tower!r} out of method.towers, or train it with method.name: full" if bare else
               "name its modules in method.target_modules instead")
        problems.append(f"method.towers: {tower!r} matches no linear layer of {type(model).__name__} "
                        f"(pattern {TOWER_PATTERNS[tower]}); {why}")
    return problems

def _mean_per_image(output, images: int) -> list[torch.Tensor]:
    """One mean feature vector per image from what `get_image_features` returned for a batch of `images`."""
    pooled = getattr(output, "pooler_output", output)
    if isinstance(pooled, (list, tuple)):
        pooled = torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])
    pooled = pooled.float().reshape(-1, pooled.shape[-1])
    if pooled.shape[0] % images:
        raise BackboneError(f"get_image_features returned {pooled.shape[0]} feature rows for {images} "
                            "images; cannot tell which belong to which image")
    return list(pooled.reshape(images, -1, pooled.shape[-1]).mean(1))



def _zero_padded_cat(values: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat` on dimension 0, zero-padding every other dimension to the largest first when shapes differ."""
    if all(value.shape[1:] == values[0].shape[1:] for value in values):
        return torch.cat(values)
    if len({value.dim() for value in values}) != 1:
        raise BackboneError(f"cannot batch image tensors of shapes {[tuple(v.shape) for v in values]}")
    largest = [max(sizes) for sizes in zip(*(value.shape[1:] for value in values))]
    out = values[0].new_zeros((sum(value.shape[0] for value in values), *largest))
    row = 0
    for value in values:
        out[(slice(row, row + value.shape[0]), *(slice(0, n) for n in value.shape[1:]))] = value
        row += value.shape[0]
    return out


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def is_generative(model: nn.Module) -> bool:
    return hasattr(model, "generate") and hasattr(model, "get_image_features")
