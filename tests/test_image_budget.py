"""The image budget and data.max_length of generative backbones (issue 18, item 4): pixel ranges for Qwen2-VL-style
processors, a longest-edge cap for the others, conversations cut at max_length but never inside image tokens, rows
that cannot fit reported before anything trains."""

from __future__ import annotations

import json

import pytest
import torch
from conversation_data import conversations, write_images, write_llava
from PIL import Image

import mmpeft
from mmpeft.backbones import BackboneError, load_backbone
from mmpeft.backbones.generative import IGNORE_INDEX
from mmpeft.cli import main
from mmpeft.core.schema import RecipeError
from mmpeft.data import DataError
from mmpeft.data.conversations import Turn, chat_messages
from mmpeft.runs.recipe import load_recipe
from mmpeft.specs import BackboneSpec
from mmpeft.testing import tiny_backbone

PHOTO = Image.new("RGB", (400, 240), (120, 30, 60))
GENERATIVE = {"method": "lora", "train": {"objective": "generative"}}


def configured(kind: str, overrides: list[str]):
    path = str(tiny_backbone(kind))
    backbone = load_backbone(BackboneSpec(id=path))
    backbone.configure(load_recipe({**GENERATIVE, "backbone": {"id": path}}, overrides))
    return backbone


def image_tokens(backbone, image: Image.Image = PHOTO) -> int:
    ids = backbone.encode_one(backbone.prompt_text("q"), [image])["input_ids"][0]
    return int((ids == backbone.base_model.config.image_token_id).sum())


@pytest.mark.parametrize(("kind", "tighter"), [
    ("qwen2vl", "data.max_pixels=1500"),  # the pixel range the processor resizes into
    ("qwen2vl", "data.max_image_edge=64"),  # the photo downscaled before the processor
    ("smolvlm", "data.max_image_edge=40"),  # fewer crops: split at one crop's edge
])
def test_a_tighter_budget_gives_fewer_image_tokens(kind, tighter):
    stock, budgeted = configured(kind, []), configured(kind, [tighter])
    assert 0 < image_tokens(budgeted) < image_tokens(stock)
    small = Image.new("RGB", (20, 12))  # already inside the budget: the same tokens either way
    assert image_tokens(budgeted, small) == image_tokens(stock, small) or kind == "smolvlm"


def test_budget_is_part_of_the_task_an_export_carries_and_resets_between_recipes():
    backbone = configured("qwen2vl", ["data.max_pixels=1500"])
    settings = backbone.task_settings()
    assert settings["max_pixels"] == 1500
    fewer = image_tokens(backbone)
    backbone.configure(load_recipe({**GENERATIVE, "backbone": {"id": backbone.name_or_path}}))
    more = image_tokens(backbone)
    assert more > fewer  # the stock size is back, not the last recipe's
    backbone.apply_task_settings(settings)
    assert image_tokens(backbone) == fewer


@pytest.mark.parametrize(("kind", "overrides", "expected"), [
    ("llava", ["data.max_pixels=2000"], "LlavaImageProcessorPil of .* resizes to a fixed size"),
    ("qwen2vl", ["data.min_pixels=5000", "data.max_pixels=2000"], r"data.min_pixels \(5000\) is larger than"),
    ("qwen2vl", ["data.min_pixels=9000"], r"than the maximum \(4096 pixels, the processor's\)"),
])
def test_budgets_a_processor_cannot_take_are_refused(kind, overrides, expected):
    path = str(tiny_backbone(kind))
    with pytest.raises(RecipeError, match=expected):  # found when the recipe is checked: no weights loaded
        load_recipe({**GENERATIVE, "backbone": {"id": path}}, overrides)
    backbone = load_backbone(BackboneSpec(id=path))
    settings = {**backbone.task_settings(), **{o.split("=")[0][5:]: int(o.split("=")[1]) for o in overrides}}
    with pytest.raises(BackboneError, match=expected):  # and by the backbone itself (an export's task settings)
        backbone.apply_task_settings(settings)


def test_budget_keys_on_a_dual_encoder_and_max_length_on_label_data_are_recipe_errors(capsys):
    with pytest.raises(RecipeError, match="data.max_image_edge: the image budget and max_length apply to generative"):
        load_recipe({"backbone": {"family": "dual_encoder"}, "method": "lora"}, ["data.max_image_edge=256"])
    with pytest.raises(RecipeError, match="data.max_length: cuts conversations"):
        load_recipe(GENERATIVE, ["data.max_length=64"])
    with pytest.raises(RecipeError, match="data.max_pixels: 0 is out of range"):
        load_recipe(GENERATIVE, ["data.max_pixels=0"])
    clip = load_backbone(BackboneSpec(id=str(tiny_backbone("clip"))))  # backbone.family: auto learns it on load
    with pytest.raises(BackboneError, match="is a dual encoder"):
        clip.configure(load_recipe({"method": "lora"}, ["data.max_image_edge=256"]))


# --- data.max_length --------------------------------------------------------------------------------------------
LONG_TALK = [Turn("user", "<image>\nWhat colour is this image?"), Turn("assistant", "red"),
             Turn("user", "Which shape is it? " * 6), Turn("assistant", "a square " * 6)]


def test_max_length_cuts_the_end_of_a_conversation_and_keeps_its_labels_aligned(tmp_path):
    whole = configured("llava", ["data.source=llava", f"data.path={tmp_path}"])
    messages, images = chat_messages(LONG_TALK), [PHOTO]
    full = whole.encode_conversation(messages, images)
    length = full["input_ids"].shape[1]
    cut = configured("llava", ["data.source=llava", f"data.path={tmp_path}", f"data.max_length={length - 10}"])
    short = cut.encode_conversation(messages, images)
    assert short["input_ids"].shape[1] == short["labels"].shape[1] == short["attention_mask"].shape[1] == length - 10
    assert torch.equal(short["input_ids"][0], full["input_ids"][0, :length - 10])
    assert torch.equal(short["labels"][0], full["labels"][0, :length - 10])
    assert (short["labels"] != IGNORE_INDEX).sum() < (full["labels"] != IGNORE_INDEX).sum()
    assert torch.equal(short["pixel_values"], full["pixel_values"])  # every image token kept
    assert torch.isfinite(cut.model(**short).loss)


def long_image_rows(root, rows: int = 12) -> list:
    """Rows whose image sits after a long question: at a small max_length their image tokens would be cut."""
    out = conversations(write_images(root), rows=rows)
    late = [([("user", "Look closely. " * 12 + "<image>\nWhat colour?"), ("assistant", "red")], out[0][1])]
    return out[:3] + late + out[3:]


def run_recipe(tmp_path, path, *overrides: str) -> dict:
    return mmpeft.run({"name": "budget", "backbone": {"id": "mmpeft-demo/tiny-llava"},
                       "data": {"source": "llava", "path": str(path), "split": {"val": 0.0, "test": 0.25}},
                       "method": {"name": "lora", "r": 4}, "train": {"objective": "generative", "epochs": 1,
                                                                       "batch_size": 4},
                       "eval": {"zero_shot": False}, "output": {"dir": str(tmp_path / "runs"), "name": "run"}},
                      list(overrides))


def test_rows_whose_images_lie_past_max_length_are_bad_rows_before_training(tmp_path, capsys):
    path = write_llava(tmp_path, long_image_rows(tmp_path))
    with pytest.raises(DataError) as caught:
        run_recipe(tmp_path, path, "data.max_length=56")
    message = str(caught.value)
    assert "1 bad row in" in message and "row 3: 189 tokens" in message and "image tokens are never cut" in message
    folder = tmp_path / "runs" / "run"
    assert not (folder / "metrics.json").exists() and not (folder / "adapter").exists()
    metrics = run_recipe(tmp_path, path, "data.max_length=56", "data.on_bad_rows=skip", "output.name=skipped")
    assert metrics["data"]["skipped"] == 1 and "image tokens are never cut" in metrics["data"]["skipped_rows"][0]
    assert sum(metrics["data"]["counts"].values()) == len(json.loads(path.read_text())) - 1


def test_mmpeft_check_tries_the_budget_on_the_folders_image_processor(capsys):
    llava, qwen = tiny_backbone("llava"), tiny_backbone("qwen2vl")
    assert main(["check", "recipes/generative-lora.yaml", f"backbone.id={llava}", "data.max_pixels=2000"]) == 2
    assert "data.max_pixels / data.min_pixels: LlavaImageProcessorPil" in capsys.readouterr().err
    assert main(["check", "recipes/generative-lora.yaml", f"backbone.id={qwen}", "data.max_pixels=2000"]) == 0
