"""The recipe's frozen dataclasses: every key, its type and its default (defaults live here and nowhere else).

Loading YAML into them (presets, overrides, cross-checks) is mmpeft.runs.recipe's job; this module only describes.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml

from mmpeft.core.schema import Range, show, to_plain

Dtype = Literal["float32", "bfloat16", "float16"]
# Numeric fields carry their valid range (checked by mmpeft.core.schema.build, reported with the YAML path).
Positive = Annotated[int, Range(ge=1)]
Seed = Annotated[int, Range(ge=0, lt=2**32)]  # numpy seeds must be in [0, 2**32)
Fraction = Annotated[float, Range(ge=0, le=1)]


@dataclass(frozen=True)
class QuantizationSpec:
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "float32"


@dataclass(frozen=True)
class BackboneSpec:
    id: str = "mmpeft-demo/digits-clip"  # hub id, local directory, or a demo backbone name
    family: Literal["auto", "dual_encoder", "generative"] = "auto"
    dtype: Dtype = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    quantization: QuantizationSpec | None = None
    init: Literal["pretrained", "scratch"] = "pretrained"  # scratch: random weights from the id's config (seed)

    def __post_init__(self) -> None:
        if self.init == "scratch" and self.quantization is not None:
            raise ValueError("backbone.init: 'scratch' cannot be combined with backbone.quantization "
                             "(random weights train in full precision)")


@dataclass(frozen=True)
class SplitSpec:
    val: Annotated[float, Range(ge=0, lt=1)] = 0.15  # fractions of all rows, stratified by class
    test: Annotated[float, Range(gt=0, lt=1)] = 0.25
    seed: Seed | None = None  # default: the recipe's seed; compare grids pin it so every cell shares one split

    def __post_init__(self) -> None:
        if not (0 <= self.val < 1 and 0 < self.test < 1 and self.val + self.test < 1):
            raise ValueError(f"split fractions val={self.val}, test={self.test} must be in [0, 1) "
                             "with test > 0 and val + test < 1")


@dataclass(frozen=True)
class AugmentSpec:
    random_resized_crop: bool = False
    crop_scale: tuple[Annotated[float, Range(gt=0, le=1)], ...] = (0.8, 1.0)
    horizontal_flip: bool = False
    color_jitter: Fraction = 0.0  # max relative change of brightness/contrast/saturation
    affine_degrees: Annotated[float, Range(ge=0, le=180)] = 0.0  # random rotation in [-d, d] degrees
    affine_translate: Fraction = 0.0  # random shift up to this fraction of the width/height


@dataclass(frozen=True)
class DataSpec:
    # llava | sharegpt | messages | llamafactory: conversation datasets for generative backbones (docs/data.md);
    # captions (open_clip tables) | webdataset (tar shards): image-caption data (docs/captions-and-shards.md)
    source: Literal["digits", "folder", "csv", "jsonl", "hf", "hf_disk", "llava", "sharegpt", "messages",
                    "llamafactory", "captions", "webdataset"] = "digits"
    path: str | None = None  # folder/file path, or a `datasets` builder/name for source: hf
    image_root: str | None = None  # where csv/jsonl image paths resolve (default: the file's folder)
    hf_split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    text_column: str = "text"  # captions, for train.objective: contrastive
    classes: tuple[str, ...] | None = None  # the label set; rows outside it are bad rows
    label_names: dict[str, str] | None = None  # raw label -> name used in prompts
    label_prompts: dict[str, tuple[str, ...]] | None = None  # per-label prompt texts (synonyms, descriptions)
    templates: tuple[str, ...] = ("a photo of a {label}.",)
    split: SplitSpec = field(default_factory=SplitSpec)
    shots: Positive | None = None  # k training examples per class (k-shot), sampled by seed
    shift: tuple[str, ...] = ()  # image shifts applied to every split, composed in order
    eval_shifts: tuple[str, ...] = ()  # extra test-time shifts ("none", "rot90", "rot90+invert", ...)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    on_bad_rows: Literal["error", "skip"] = "error"
    # Images with more pixels (read from the file's header, before decoding) are bad rows; null: no cap. Well below
    # PIL's decompression-bomb limit (~179M), so a tiny file claiming a huge size is refused before it is decoded.
    max_image_pixels: Positive | None = 50_000_000
    subset: Literal["pretrain", "heldout"] | None = None  # digits only: the fixed 60/40 pre-training partition
    # Generative backbones: each image is asked `question` (or its row's own `prompt_column` value) and answers with
    # its row's text (`text_column`) or `answer_template` filled with the class name.
    question: str = "What is in the image?"
    prompt_column: str = "prompt"
    answer_template: str = "{label}"
    name: str | None = None  # data.source: llamafactory: the entry of dataset_info.json (data.path)
    # The image budget of generative backbones (docs/generative.md): the pixel range a dynamic-resolution processor
    # (Qwen2-VL, Qwen2.5-VL) resizes into, and a cap on every image's longest edge (and on the edge Idefics3/SmolVLM
    # split at) for the others; conversations' tokens past max_length are cut, never image tokens.
    max_pixels: Positive | None = None
    min_pixels: Positive | None = None
    max_image_edge: Positive | None = None
    max_length: Positive | None = None
    # Decoded images, fitted to the backbone's processor, kept across epochs, evaluations, seeds, grid cells and
    # sequence tasks: "auto" (memory up to MMPEFT_IMAGE_CACHE_MB, then memory-mapped files under
    # $MMPEFT_CACHE/images), "memory", "disk", or "off" (decode every time; YAML's bare `off`, read as false, works).
    image_cache: Literal["auto", "memory", "disk", "off", False] = "auto"
    # Caption tables (source: captions, open_clip's layout) and WebDataset shards (source: webdataset); see
    # docs/captions-and-shards.md. separator: column separator of csv/captions files (default "," / tab).
    separator: str | None = None
    eval_path: str | None = None  # captions/webdataset: a held-out table or shard pattern, the test split
    # Streaming the training shards (source: webdataset) instead of indexing them: shards in an order shuffled by
    # (seed, epoch), samples through a seeded shuffle buffer (0: shard order only); val comes from val_path.
    stream: bool = False
    shuffle_buffer: Annotated[int, Range(ge=0)] = 1000
    samples_per_epoch: Positive | None = None  # default: counted once by a pass over the shards (no decoding)
    val_path: str | None = None  # stream: held-out shards for validation (a stream has no random val share)

    def __post_init__(self) -> None:
        if self.image_cache is False:  # YAML 1.1 reads a bare `off` as false: that is what the user wrote
            object.__setattr__(self, "image_cache", "off")
        if self.image_cache not in ("auto", "memory", "disk", "off"):
            raise ValueError(f"data.image_cache: {self.image_cache!r} is not one of 'auto', 'memory', 'disk', 'off'")
        if self.eval_path is not None and self.source not in ("captions", "webdataset"):
            raise ValueError(f"data.eval_path applies to data.source: captions or webdataset, not {self.source!r}")
        if self.stream and self.source != "webdataset":
            raise ValueError(f"data.stream: true streams WebDataset shards; data.source is {self.source!r}, not "
                             "webdataset")
        for key in ("samples_per_epoch", "val_path"):
            if getattr(self, key) is not None and not self.stream:
                raise ValueError(f"data.{key} applies to a streamed training split (data.stream: true) only")
        if self.separator is not None and (len(self.separator) != 1 or self.source not in ("csv", "captions")):
            raise ValueError(f"data.separator: {self.separator!r} must be one character, for data.source: csv or "
                             "captions")
        if "{label}" not in self.answer_template:
            raise ValueError(f"data.answer_template: {self.answer_template!r} has no {{label}} placeholder")
        if problem := template_problem(self.answer_template):
            raise ValueError(f"data.answer_template: {self.answer_template!r} {problem}")
        if self.source != "digits" and not self.path:
            raise ValueError(f"data.path is required for data.source: {self.source}")
        if self.subset is not None and self.source != "digits":
            raise ValueError(f"data.subset: {self.subset!r} applies to data.source: digits only, "
                             f"not {self.source!r}")
        for i, template in enumerate(self.templates):
            if "{label}" not in template:
                raise ValueError(f"data.templates: {show(template)} has no {{label}} placeholder")
            if problem := template_problem(template):
                raise ValueError(f"data.templates[{i}]: {show(template)} {problem}")


def template_problem(template: str) -> str | None:
    """Why `template.format(label=...)` would fail at zero-shot time (KeyError, IndexError, ValueError) or leave the
    label out; None for a good template."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:  # a lone brace
        return f"is not a valid template ({error}); write {{{{ or }}}} for a literal brace"
    for _, name, _, _ in parts:
        if name is not None and name != "label":
            return (f"has the unknown field {{{name}}}: only {{label}} is filled in; write {{{{ or }}}} for a "
                    "literal brace")
    if all(name != "label" for _, name, _, _ in parts):
        return "has no {label} field ({{label}} is literal text)"
    return None


GENERATIVE_DATA_KEYS = ("max_pixels", "min_pixels", "max_image_edge", "max_length")  # generative backbones only
Tracker = Literal["tensorboard", "mlflow", "wandb"]


@dataclass(frozen=True)
class TrainSpec:
    objective: Literal["classification", "contrastive", "generative"] = "classification"  # generative: answer loss
    epochs: Positive = 5
    batch_size: Positive = 32  # per process
    lr: Annotated[float, Range(gt=0)] = 1e-3
    weight_decay: Annotated[float, Range(ge=0)] = 0.01
    warmup_ratio: Fraction = 0.1
    grad_accum_steps: Positive = 1
    max_grad_norm: Annotated[float, Range(gt=0)] | None = 1.0  # null: no clipping
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # the val score that keeps the best epoch; "retrieval": image->text R@1 on val, what caption-only data (no
    # classes to score) always selects by
    select_metric: Literal["accuracy", "macro_f1", "loss", "retrieval"] = "accuracy"
    early_stopping_patience: Positive | None = None  # epochs without val improvement
    checkpoint_every_steps: Positive | None = None  # also at every epoch end
    # trackers (tensorboard, mlflow, wandb; one name is a list of one): recipe, train/val and test metrics, report
    log_with: tuple[Tracker, ...] | None = None
    # DataLoader worker processes: "auto" (a share of the cores; 0 where images come ready from the memory cache)
    # or a number (0: load in the training process). Results do not depend on it.
    num_workers: Annotated[int, Range(ge=0)] | Literal["auto"] = "auto"
    # Image features of a frozen image tower (zero-shot, linear probe, text-side methods) are computed once and
    # reused across epochs and runs: "memory" (this process), "disk" (also under $MMPEFT_CACHE/features), or
    # "recompute" (encode every batch; not "off", which YAML reads as false).
    feature_cache: Literal["memory", "disk", "recompute"] = "memory"
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"  # adamw_8bit: bitsandbytes, CUDA only
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun / accelerate launch; one process ignores it
    tracking_uri: str = "./mlruns"  # MLflow: a local folder (file store) or any MLflow tracking URI
    tracking_experiment: str | None = None  # MLflow experiment / W&B project and group; default: the recipe's name

    def __post_init__(self) -> None:
        if self.num_workers != "auto" and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                                           or self.num_workers < 0):
            raise ValueError(f"train.num_workers must be 'auto' or an integer >= 0, got {self.num_workers!r}")


@dataclass(frozen=True)
class EvalSpec:
    batch_size: Positive = 64
    zero_shot: bool = True  # evaluate the untouched backbone first, for comparison
    # false: the test split is never evaluated (zero-shot included): validation only, as `mmpeft search` trials run
    test: bool = True
    retrieval: bool | None = None  # image<->text recall on the test split; default: on for objective contrastive
    length_normalize: bool = False  # generative label scoring: mean instead of sum of the answer's token log-probs
    generate: bool = False  # generative: also generate free-form answers (exact and normalised match)
    max_new_tokens: Positive = 16  # generation length limit for eval.generate


@dataclass(frozen=True)
class OutputSpec:
    dir: str = "runs"
    name: str | None = None  # default: <recipe name>-<timestamp>

    def __post_init__(self) -> None:
        name = self.name
        if name is not None and (not name or name in (".", "..") or "/" in name or "\\" in name or ":" in name):
            raise ValueError(f"output.name: {name[:80]!r} must be a plain folder name (no '/', '\\', ':', "
                             "'..'): the run folder is created inside output.dir; put any sub-folders in output.dir")


@dataclass(frozen=True)
class Recipe:
    method: Any  # a method's own config dataclass (see mmpeft.methods)
    seed: Seed = 0
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    name: str = "recipe"

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)
