"""Generative backbones on two tiny architectures (LLaVA, Qwen2-VL): answer-only labels, LoRA per tower, label
scoring, in-context prompts with truncation, QLoRA on CPU, and the pipeline end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mmpeft
from mmpeft.backbones import load_backbone
from mmpeft.backbones.generative import IGNORE_INDEX, GenerativeTask
from mmpeft.backbones.scoring import score_answers, score_answers_per_label
from mmpeft.core.schema import RecipeError
from mmpeft.data import ImageDataset, collate_images, load_data
from mmpeft.evaluation.answers import answer_metrics, normalize_answer
from mmpeft.evaluation.icl import Demo, build_prompt, select_demos
from mmpeft.methods import METHODS
from mmpeft.methods.lora import LoraSpec
from mmpeft.objectives import make_objective
from mmpeft.runs.icl import run_icl_sweep
from mmpeft.runs.recipe import load_recipe
from mmpeft.specs import BackboneSpec, QuantizationSpec
from mmpeft.testing import tiny_backbone

KINDS = ("llava", "qwen2vl")
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
END_OF_TURN = {"llava": "</s>", "qwen2vl": "<|im_end|>"}
IMAGE_MARK = {"llava": "<image>", "qwen2vl": "<|vision_start|>"}



def image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def backbone_of(kind: str, **spec):
    backbone = load_backbone(BackboneSpec(id=str(tiny_backbone(kind)), **spec))
    backbone.task = GenerativeTask(question="What digit is this?")
    return backbone


class Labels:
    """The part of a LabelSet the objective and scoring read."""

    names = DIGITS


def batch_of(backbone, labels: list[int], texts: list[str | None] | None = None) -> dict:
    items = [{"image": image(i), "label": label, "index": i} for i, label in enumerate(labels)]
    for item, text in zip(items, texts or [None] * len(items)):
        if text:
            item["text"] = text
    return collate_images(backbone.preprocess)(items)


def apply_lora(backbone, **config) -> None:
    torch.manual_seed(0)
    METHODS.get("lora")().apply(backbone, LoraSpec(**{"r": 4, "alpha": 8, **config}))


def train_steps(backbone, batch: dict, steps: int, lr: float) -> list[float]:
    objective = make_objective("generative", backbone, Labels())
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=lr)
    backbone.train()
    losses = []
    for _ in range(steps):
        loss = objective.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    backbone.eval()
    return losses


def test_loading_registers_qwen_processor_and_refuses_a_bare_tokenizer(monkeypatch):
    from mmpeft.backbones import BackboneError, generative

    backbone = backbone_of("qwen2vl")
    assert type(backbone.processor).__name__ == "Qwen2VLImageOnlyProcessor"  # not a bare tokenizer
    real = generative.load_pretrained
    monkeypatch.setattr(generative, "load_pretrained", lambda *a: (real(*a)[0], backbone.tokenizer))
    with pytest.raises(BackboneError, match="not a processor with an image processor"):
        load_backbone(BackboneSpec(id=str(tiny_backbone("qwen2vl"))))


@pytest.mark.parametrize("kind", KINDS)
def test_labels_mask_everything_but_the_answer(kind):
    backbone = backbone_of(kind)
    batch = batch_of(backbone, [7, 3], texts=[None, "It is a three."])
    inputs = make_objective("generative", backbone, Labels()).inputs(batch)
    tokenizer = backbone.tokenizer
    for row, answer in enumerate(["seven", "It is a three."]):
        labels, ids = inputs["labels"][row], inputs["input_ids"][row]
        kept = labels != IGNORE_INDEX
        assert torch.equal(labels[kept], ids[kept])
        assert tokenizer.decode(labels[kept]).strip() == answer + END_OF_TURN[kind]
        prompt = tokenizer.decode(ids[~kept & (inputs["attention_mask"][row] == 1)])
        assert "What digit is this?" in prompt and answer not in prompt
        first = int(kept.nonzero()[0])
        assert kept[first:].sum() == kept.sum() and not kept[:first].any()  # one contiguous answer span


@pytest.mark.parametrize("kind", KINDS)
def test_lora_on_the_language_model_lowers_the_answer_loss(kind):
    backbone = backbone_of(kind)
    apply_lora(backbone)  # towers left out: the family default, the language model only
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)
    losses = train_steps(backbone, batch_of(backbone, [1, 4, 7, 9]), steps=4, lr=1e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", KINDS)
def test_each_tower_has_lora_targets(kind):
    backbone = backbone_of(kind)
    apply_lora(backbone, towers=("all",))
    names = [n for n, _ in backbone.model.named_parameters() if "lora_A" in n]
    vision = "vision_tower" if kind == "llava" else "visual.blocks"
    projector = "multi_modal_projector" if kind == "llava" else "merger"
    for part in ("language_model", vision, projector):
        assert any(part in n for n in names), part


def test_towers_are_checked_per_family():
    with pytest.raises(RecipeError) as caught:
        load_recipe({"method": {"name": "lora", "towers": ["text"]}, "backbone": {"family": "generative"}})
    assert "'text' is not a tower of generative" in str(caught.value) and "language, vision, projector" in str(
        caught.value)
    with pytest.raises(RecipeError) as caught:
        load_recipe({"method": {"name": "lora", "towers": ["projector"]}, "backbone": {"family": "dual_encoder"}})
    assert "'projector' is not a tower of dual_encoder" in str(caught.value)
    with pytest.raises(RecipeError) as caught:
        load_recipe({"method": "lora", "train": {"objective": "generative"}, "backbone": {"family": "dual_encoder"}})
    assert "train.objective" in str(caught.value)
    assert load_recipe({"method": "lora", "backbone": {"family": "generative"}}).method.towers is None


@pytest.mark.parametrize("kind", KINDS)
def test_shared_prefix_scores_equal_one_forward_per_label(kind):
    backbone = backbone_of(kind)
    texts = [backbone.prompt_text("What digit is this?")] * 3
    images = [[image(i)] for i in range(3)]
    answers = [backbone.answer_ids(name) for name in DIGITS]
    assert len({len(a) for a in answers}) > 1  # answers of several lengths: padding is exercised
    with torch.no_grad():
        for normalize in (False, True):
            shared = score_answers(backbone, texts, images, answers, normalize)
            reference = score_answers_per_label(backbone, texts, images, answers, normalize)
            torch.testing.assert_close(shared, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_scoring_ranks_the_trained_label_first_after_a_short_overfit(kind):
    backbone = backbone_of(kind)
    apply_lora(backbone, towers=("language", "projector"))
    batch = batch_of(backbone, [7])
    answers = backbone.class_text_features(Labels())
    train_steps(backbone, batch, steps=12, lr=2e-2)
    with torch.no_grad():
        scores = backbone.logits(batch, answers)[0]
    assert int(scores.argmax()) == 7, scores


def demos(k: int) -> list[Demo]:
    return [Demo(image(100 + i), f"Question {i}?", DIGITS[i]) for i in range(k)]


@pytest.mark.parametrize("kind", KINDS)
def test_in_context_prompt_has_k_demo_images_in_order_and_the_query_last(kind):
    backbone = backbone_of(kind)
    shown, query = demos(3), image(7)
    prompt = build_prompt(backbone, shown, "What digit is this?", query)
    assert prompt.images == [d.image for d in shown] + [query] and prompt.dropped == 0
    text = prompt.text
    assert text.count(IMAGE_MARK[kind]) == 4
    marks = [i for i in range(len(text)) if text.startswith(IMAGE_MARK[kind], i)]
    answers = [text.index(f"{d.answer}{END_OF_TURN[kind]}") for d in shown]
    questions = [text.index(d.question) for d in shown]
    assert marks[0] < questions[0] < answers[0] < marks[1] < questions[1] < answers[1] < marks[2]  # in order
    assert answers[2] < marks[3] < text.rindex("What digit is this?")  # the query comes last
    per_image = 16 if kind == "llava" else 4
    image_id = backbone.processor.image_token_id
    assert int((prompt.encoded["input_ids"] == image_id).sum()) == 4 * per_image


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_drops_whole_demonstrations(kind):
    backbone = backbone_of(kind)
    shown, query = demos(4), image(7)
    two = build_prompt(backbone, shown[2:], "What digit is this?", query)
    limit = two.encoded["input_ids"].shape[1]
    cut = build_prompt(backbone, shown, "What digit is this?", query, max_length=limit)
    assert cut.kept == shown[2:] and cut.dropped == 2 and not cut.over_limit
    assert cut.text == two.text and torch.equal(cut.encoded["input_ids"], two.encoded["input_ids"])
    assert cut.images == [d.image for d in shown[2:]] + [query]
    tiny = build_prompt(backbone, shown, "What digit is this?", query, max_length=5)
    assert tiny.kept == [] and tiny.dropped == 4 and tiny.over_limit


def test_demo_strategies():
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    random4 = select_demos("random", 4, labels, seed=0, query=5)
    assert select_demos("random", 2, labels, seed=0, query=5) == random4[:2]  # nested in k
    assert random4 != select_demos("random", 4, labels, seed=1, query=5)
    balanced = select_demos("balanced", 3, labels, seed=0, query=5)
    assert sorted(labels[i] for i in balanced) == [0, 1, 2]
    similarity = np.array([0.1, 0.9, 0.3, 0.8, 0.0, 0.0, 0.0, 0.0, 0.2])
    assert select_demos("nearest", 3, labels, seed=0, query=0, similarity=similarity) == [2, 3, 1]
    with pytest.raises(ValueError, match="valid: random, balanced, nearest"):
        select_demos("closest", 1, labels, seed=0, query=0)


def test_answer_normalisation():
    assert normalize_answer("Seven.") == normalize_answer("7") == "7"
    assert normalize_answer("The red, square!") == "red square"
    scores = answer_metrics(["Seven.", "two", "a cat"], ["7", "two", "dog"])
    assert scores["exact_match"] == pytest.approx(1 / 3) and scores["normalized_match"] == pytest.approx(2 / 3)
    assert scores["token_f1"] == pytest.approx(2 / 3)  # "a cat" vs "dog": no shared word
    partial = answer_metrics(["a red square on the left"], ["red square"], questions=["What is it?"])
    assert partial["normalized_match"] == 0 and partial["token_f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert partial["examples"] == [{"prediction": "a red square on the left", "reference": "red square",
                                    "question": "What is it?"}]


def test_qlora_4bit_step_on_cpu():
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    backbone = backbone_of("llava", quantization=QuantizationSpec(bits=4))
    linear4 = [n for n, m in backbone.model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert any("language_model" in n for n in linear4)
    apply_lora(backbone)
    lora_b = {n: p.detach().clone() for n, p in backbone.named_parameters() if "lora_B" in n}
    losses = train_steps(backbone, batch_of(backbone, [2, 5]), steps=2, lr=1e-2)
    assert all(np.isfinite(losses))
    assert all(not torch.equal(p, lora_b[n]) for n, p in backbone.named_parameters() if n in lora_b)


def recipe(folder, tmp_path, **changes) -> dict:
    data = {"source": "folder", "path": str(folder), "question": "What colour is this image?",
            "split": {"val": 0.0, "test": 0.25}, "shots": 4}
    base = {"name": "gen", "backbone": {"id": str(tiny_backbone("llava"))}, "data": data,
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "train": {"objective": "generative", "epochs": 2, "batch_size": 6, "lr": 0.01},
            "eval": {"batch_size": 16, "generate": True, "max_new_tokens": 3},
            "output": {"dir": str(tmp_path / "runs"), "name": "run"}}
    base.update(changes)
    return base


def test_pipeline_runs_a_generative_recipe(color_folder, tmp_path):
    mmpeft.run(recipe(color_folder, tmp_path))
    run_dir = tmp_path / "runs" / "run"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(saved["test"]) >= {"accuracy", "macro_f1", "confusion_matrix"} and saved["test"]["n"] == 18
    assert set(saved["answers"]) == {"zero_shot", "test"} and 0 <= saved["answers"]["test"]["exact_match"] <= 1
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert "language_model" in adapter["target_modules"]


def test_rows_bring_their_own_question_and_answer(tmp_path):
    for i in range(4):
        image(i).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "label": "red" if i % 2 else "blue", "prompt": f"Q{i}?",
             "text": f"It is {'red' if i % 2 else 'blue'}." if i < 2 else None} for i in range(4)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = load_recipe({"method": "zero_shot", "data": {"source": "jsonl", "path": str(tmp_path / "rows.jsonl"),
                                                        "split": {"val": 0.0, "test": 0.5}}}).data
    data = load_data(spec, 0)
    backbone = backbone_of("llava")
    every = ImageDataset(data.train + data.test)
    batch = collate_images(backbone.preprocess)([every[i] for i in range(len(every))])
    assert sorted(backbone.questions(batch)) == ["Q0?", "Q1?", "Q2?", "Q3?"]
    objective = make_objective("generative", backbone, data.labels)
    assert sorted(objective.answers(batch)) == ["It is blue.", "It is red.", "blue", "red"]


def test_icl_sweep_rows_and_plot(color_folder, tmp_path):
    rows = run_icl_sweep(recipe(color_folder, tmp_path, method="zero_shot"), shots=(0, 1, 2),
                         seeds=(0,), out_dir=tmp_path / "icl", max_queries=6)
    assert len(rows) == 9 and {r["method"] for r in rows} == {"icl-random", "icl-balanced", "icl-nearest"}
    zero = [r for r in rows if r["shots"] == 0]
    assert len({(r["accuracy"], r["macro_f1"]) for r in zero}) == 1
    assert all(r["n"] == 6 and r["truncated_prompts"] == 0 for r in rows)
    for name in ("icl.json", "icl.md", "icl_accuracy.png"):
        assert (tmp_path / "icl" / name).is_file()
