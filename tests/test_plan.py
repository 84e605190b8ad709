"""`mmpeft plan`: counts equal the instantiated model's, the meta trace keeps what a real forward keeps, the verdict
flips exactly at the planned total, suggestions really fit, and bad input gives clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

import mmpeft
from mmpeft.backbones import load_backbone
from mmpeft.cli import main
from mmpeft.core.schema import RecipeError
from mmpeft.methods import METHODS, count_parameters
from mmpeft.planner import PlanError, format_bytes, parse_memory, plan, plan_labels, plan_recipe, step_shape
from mmpeft.planner.model import build_meta_backbone
from mmpeft.planner.trace import trace_step
from mmpeft.runs.recipe import load_recipe

GiB = 2**30


def recipe_data(backbone_dir, folder, method: str | dict = "lora", **train) -> dict:
    return {"backbone": {"id": str(backbone_dir)}, "data": {"source": "folder", "path": str(folder)},
            "method": method, "train": {"batch_size": 8, **train}}


def built(recipe, labels):
    """The real backbone, loaded and wrapped as a run does."""
    torch.manual_seed(0)
    backbone = load_backbone(recipe.backbone)
    METHODS.get(recipe.method.name)().apply(backbone, recipe.method, labels)
    return backbone.train()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_parameter_counts_equal_the_instantiated_model(kind, method, tiny_clip_dir, tiny_siglip_dir, color_folder):
    recipe = load_recipe(recipe_data(tiny_clip_dir if kind == "clip" else tiny_siglip_dir, color_folder, method))
    planned = plan_recipe(recipe)
    backbone = built(recipe, plan_labels(recipe.data))
    real = count_parameters(backbone)
    assert (planned["total_params"], planned["trainable_params"]) == (real["total"], real["trainable"])
    assert planned["counted_by"] == "meta"
    tensors = [*backbone.parameters(), *backbone.buffers()]
    assert planned["bytes"]["weights"] == sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("kind,method", [("clip", "lora"), ("siglip", "full")])
def test_meta_trace_keeps_what_a_real_forward_keeps(kind, method, tiny_clip_dir, tiny_siglip_dir, color_folder):
    """Saved-for-backward bytes of the meta trace equal those of a real CPU forward (torch's fused attention)."""
    recipe = load_recipe(recipe_data(tiny_clip_dir if kind == "clip" else tiny_siglip_dir, color_folder, method))
    labels = plan_labels(recipe.data)
    meta = build_meta_backbone(recipe, labels)
    shape = step_shape(meta, recipe, batch=4)
    planned = trace_step(meta, shape).total
    backbone = built(recipe, labels)
    ids = torch.zeros(shape.text_rows, shape.text_length, dtype=torch.long)

    def step() -> torch.Tensor:
        logits = backbone.classify(torch.randn(4, 3, shape.image_size, shape.image_size), backbone.encode_texts(ids))
        return F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))

    assert planned == kept_for_backward(backbone, step)


def test_verdict_flips_at_the_planned_total(tiny_clip_dir, color_folder):
    data = recipe_data(tiny_clip_dir, color_folder, "full")
    total = plan(data, gpu_memory="80GiB")[0]["bytes"]["total"]
    just_enough, just_short = plan(data, gpu_memory=total)[0], plan(data, gpu_memory=total - 1)[0]
    assert just_enough["fits"] is True and just_enough["max_batch"] >= 8
    assert just_short["fits"] is False and just_short["max_batch"] < 8
    assert just_short["suggestions"], "a plan that does not fit says what to change"


def test_suggested_changes_fit_when_applied(tiny_clip_dir, color_folder):
    data = recipe_data(tiny_clip_dir, color_folder, "lora", batch_size=64)
    budget = plan(data, ["train.gradient_checkpointing=true"], gpu_memory=2**40)[0]["bytes"]["total"]  # just enough
    tight = plan(data, gpu_memory=budget)[0]
    assert tight["fits"] is False
    changes = [s["change"] for s in tight["suggestions"] if s["change"]]
    assert any("train.batch_size=" in c and "train.grad_accum_steps=" in c for c in changes)
    assert any("train.gradient_checkpointing=true" in c for c in changes)
    for change in changes:
        again = plan(data, change.split(), gpu_memory=budget)[0]
        assert again["fits"], change


def test_quantized_weights_match_bitsandbytes(tiny_siglip_dir, color_folder):
    from mmpeft.backbones.quantization import weight_bytes

    for bits in (4, 8):
        data = recipe_data(tiny_siglip_dir, color_folder, "lora")
        data["backbone"]["quantization"] = {"bits": bits}
        recipe = load_recipe(data)
        planned = plan_recipe(recipe)["bytes"]["weights"]
        real = weight_bytes(built(recipe, plan_labels(recipe.data)).model)
        assert abs(planned - real) / real < 0.03, (bits, planned, real)


def test_compare_grid_plans_every_method(tiny_clip_dir, color_folder, capsys):
    data = recipe_data(tiny_clip_dir, color_folder)
    del data["method"]
    data["grid"] = {"methods": ["lora", "full"], "seeds": [0]}
    plans = plan(data, gpu_memory="24GiB")
    assert [p["method"] for p in plans] == ["lora", "full"]
    assert plans[0]["trainable_params"] < plans[1]["trainable_params"]


def test_cli_prints_the_table(tiny_clip_dir, color_folder, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(tiny_clip_dir, color_folder)))
    assert main(["plan", str(path), "--gpu-memory", "24GiB", "train.batch_size=4"]) == 0  # overrides anywhere
    out = capsys.readouterr().out
    assert "batch 4 |" in out
    for expected in ("weights", "gradients", "optimizer state", "activations", "total", "fits in 24 GiB"):
        assert expected in out
    assert mmpeft.plan(str(path))[0]["batch_size"] == 8  # the API twice: `mmpeft.plan` stays the function
    assert callable(mmpeft.plan)


def test_unknown_backbone_is_one_clear_line(color_folder, capsys, tmp_path):
    data = recipe_data("nobody/no-such-model", color_folder)
    with pytest.raises(PlanError) as caught:
        plan(data)
    message = str(caught.value)
    assert "\n" not in message
    assert "'nobody/no-such-model'" in message and "mmpeft-demo/tiny-clip" in message and "cached" in message
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", str(path)]) == 2
    assert "nobody/no-such-model" in capsys.readouterr().err


def test_unknown_method_names_the_valid_ones(tiny_clip_dir, color_folder):
    with pytest.raises(RecipeError) as caught:
        plan(recipe_data(tiny_clip_dir, color_folder, {"name": "lorax"}))
    message = str(caught.value)
    assert "'lorax'" in message and "did you mean 'lora'" in message and "valid:" in message


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * GiB), ("80GB", 80 * 10**9), ("512MiB", 512 * 2**20),
                                           ("1.5 TiB", int(1.5 * 2**40)), ("16gi", 16 * GiB), (1000, 1000)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text,hint", [("24", "give a unit"), ("24G", "unknown unit 'G'"),
                                       ("lots", "expected a number"), ("0GiB", "must be positive"),
                                       (-5, "must be positive")])
def test_parse_memory_errors_say_what_is_wrong(text, hint):
    with pytest.raises(ValueError, match=hint):
        parse_memory(text)


def test_format_bytes():
    assert [format_bytes(n) for n in (12, 1536, 812 * 2**20, 1.5 * GiB)] == ["12 B", "1.5 KiB", "812 MiB", "1.5 GiB"]


def test_hub_id_with_only_its_config_cached(tiny_clip_dir, color_folder, tmp_path, monkeypatch):
    """A hub id plans from the local HF cache alone (config.json, no tokenizer, no weights), offline."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someorg--clip-small"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    shutil.copy(tiny_clip_dir / "config.json", repo / "snapshots" / ("a" * 40) / "config.json")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    planned = plan(recipe_data("someorg/clip-small", color_folder), gpu_memory="1GiB")[0]
    local = load_recipe(recipe_data(tiny_clip_dir, color_folder))
    expected = count_parameters(built(local, plan_labels(local.data)))
    assert (planned["total_params"], planned["trainable_params"]) == (expected["total"], expected["trainable"])
    assert any("no tokenizer" in note for note in planned["notes"])
    with pytest.raises(PlanError, match="cached: someorg/clip-small"):
        plan(recipe_data("someorg/other", color_folder))


@pytest.mark.parametrize(("regulariser", "tasks", "copies"), [
    ("naive", 2, 0), ("l2sp", 2, 1), ("ewc", 2, 2), ("ewc", 3, 4), ("online_ewc", 3, 2),
    ("adapter_per_task", 3, 3), ("replay", 2, 0),
])
def test_continual_plan_adds_what_the_regulariser_holds(regulariser, tasks, copies, capsys):
    three = '[{classes: ["0","1","2"]}, {classes: ["3","4","5"]}, {classes: ["6","7","8","9"]}]'
    overrides = [f"regulariser={regulariser}"] + ([f"tasks={three}"] if tasks == 3 else [])
    planned = plan("recipes/continual-ewc.yaml", overrides)
    alone = plan("recipes/continual-ewc.yaml", ["regulariser=naive"])[0]["bytes"]
    assert [p["label"] for p in planned] == [f"lora + {regulariser}"]
    held = planned[0]["bytes"]
    assert held["gradients"] > 0 and held["regulariser"] == copies * held["gradients"]
    assert held["peak"] - alone["peak"] == held["regulariser"]
    assert main(["plan", "recipes/continual-ewc.yaml", *overrides]) == 0
    assert ("regulariser state" in capsys.readouterr().out) == (copies > 0)


def test_regulariser_grid_plans_each_regulariser():
    plans = plan("recipes/compare-regularisers.yaml")
    labels = [p["label"] for p in plans]
    assert labels == ["lora + naive", "lora + ewc", "lora + lwf", "lora + replay"]
    assert plans[1]["bytes"]["regulariser"] == 2 * plans[1]["bytes"]["gradients"]


# --- generative VLMs -----------------------------------------------------------------------------------------------

def generative_data(kind: str, method: str | dict | None = None, **data) -> dict:
    from mmpeft.testing import tiny_backbone

    return {"backbone": {"id": str(tiny_backbone(kind))},
            "data": {"source": "digits", "question": "What digit is this?", **data},
            "method": method or {"name": "lora", "r": 4, "alpha": 8},
            "train": {"objective": "generative", "batch_size": 2}}


def built_generative(recipe):
    torch.manual_seed(0)
    backbone = load_backbone(recipe.backbone)
    backbone.configure(recipe)
    METHODS.get(recipe.method.name)().apply(backbone, recipe.method, plan_labels(recipe.data))
    return backbone.train()


def kept_for_backward(backbone, step) -> int:
    """Bytes of the tensors a real step (`step()` returns its loss) keeps for backward, parameters aside."""
    params = {p.untyped_storage()._cdata for p in backbone.parameters()}
    kept: dict[int, int] = {}
    hold = []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            kept.setdefault(storage._cdata, storage.nbytes())
            hold.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        assert step().requires_grad
    return sum(kept.values())


@pytest.mark.parametrize("kind", ["llava", "idefics3", "smolvlm", "qwen2vl", "qwen25vl", "paligemma", "gemma3"])
def test_generative_parameter_counts_equal_the_instantiated_model(kind):
    recipe = load_recipe(generative_data(kind))
    planned = plan_recipe(recipe, device="cpu")
    real = count_parameters(built_generative(recipe))
    assert (planned["total_params"], planned["trainable_params"]) == (real["total"], real["trainable"])
    assert planned["sequence_length"] > planned["image_tokens"] > 0 and planned["images_per_example"] == 1
    assert planned["bytes"]["activations"] > 0


@pytest.mark.parametrize(("kind", "towers"), [("llava", ["language", "projector"]), ("qwen2vl", ["language", "vision"]),
                                              ("gemma3", ["language"]), ("smolvlm", ["language", "vision"])])
def test_generative_activations_match_a_real_step(kind, towers):
    """Planned activation bytes against what a real CPU step of the tiny model keeps for backward (its worst-case
    example, batch 2: no padding)."""
    from mmpeft.planner import meta_backbone
    from mmpeft.planner.generative import worst_case

    recipe = load_recipe(generative_data(kind, {"name": "lora", "r": 4, "alpha": 8, "towers": towers}))
    planned = plan_recipe(recipe, device="cpu")
    assert not any("not in the plan" in note for note in planned["notes"])
    case = worst_case(meta_backbone(recipe), recipe)
    backbone = built_generative(recipe)
    real = kept_for_backward(backbone, lambda: backbone.model(**backbone.to_model(backbone.stack([case.inputs] * 2)))
                             .loss)
    assert abs(planned["bytes"]["activations"] - real) <= 0.3 * real, (planned["bytes"]["activations"], real)


@pytest.mark.parametrize("kind", ["llava", "qwen2vl"])
def test_generative_classification_objective_matches_a_real_step(kind):
    """train.objective classification on a generative backbone scores every class's answer on a repeated cache:
    the plan traces that step, not the answer loss."""
    from PIL import Image

    from mmpeft.objectives.classification import Classification

    data = generative_data(kind, {"name": "lora", "r": 4, "alpha": 8, "towers": ["language", "projector"]})
    data["train"] = {"objective": "classification", "batch_size": 3}
    recipe = load_recipe(data)
    planned = plan_recipe(recipe, device="cpu")
    answer_loss = plan_recipe(load_recipe({**data, "train": {"objective": "generative", "batch_size": 3}}),
                              device="cpu")
    assert planned["bytes"]["activations"] > answer_loss["bytes"]["activations"]
    assert any("against all 10 class answers" in note for note in planned["notes"])
    backbone = built_generative(recipe)
    objective = Classification(backbone, plan_labels(recipe.data))
    edge = planned["image_size"]
    batch = {"pixel_values": [Image.new("RGB", (edge, edge))] * 3, "labels": torch.zeros(3, dtype=torch.long)}
    real = kept_for_backward(backbone, lambda: objective.loss(batch))
    assert abs(planned["bytes"]["activations"] - real) <= 0.3 * real, (planned["bytes"]["activations"], real)


def test_generative_plan_grows_with_the_image_budget_and_the_text():
    def planned(question="What digit is this?", answer_template="{label}", **budget):
        data = generative_data("qwen2vl", question=question, answer_template=answer_template, **budget)
        return plan_recipe(load_recipe(data), device="cpu")

    small, large = planned(max_pixels=32 * 32), planned(max_pixels=64 * 64)
    assert (small["image_size"], large["image_size"]) == (32, 64)
    assert small["image_tokens"] < large["image_tokens"]
    assert small["sequence_length"] < large["sequence_length"]
    assert small["bytes"]["activations"] < large["bytes"]["activations"]
    assert any("data.max_pixels 1,024" in note for note in small["notes"])
    longer = planned("What digit is this? " * 8)
    assert longer["sequence_length"] > large["sequence_length"]
    assert longer["bytes"]["activations"] > large["bytes"]["activations"]
    answer = planned(answer_template="The digit in this scan is {label}, written by hand")  # via the DataSpec key
    assert answer["sequence_length"] > large["sequence_length"]
    stock = plan_recipe(load_recipe(generative_data("smolvlm")), device="cpu")
    capped = plan_recipe(load_recipe(generative_data("smolvlm", max_image_edge=40)), device="cpu")
    assert capped["image_tokens"] < stock["image_tokens"]  # split at one crop's edge: fewer crops
    assert capped["sequence_length"] < stock["sequence_length"]


def test_conversation_plan_measures_the_longest_row(tmp_path):
    """Conversation data: the longest row's turns and its images set the sequence; more images, more tokens."""
    import json

    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"id": "0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "short.json").write_text(json.dumps(rows))
    rows.append({"id": "1", "image": ["a.png", "a.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nCompare them?"}, {"from": "gpt", "value": "red and red"},
        {"from": "human", "value": "And now?"}, {"from": "gpt", "value": "still red"}]})
    (tmp_path / "long.json").write_text(json.dumps(rows))

    def planned(name, **keys):
        data = generative_data("llava")
        data["data"] = {"source": "llava", "path": str(tmp_path / name), **keys}
        return plan(data)[0]

    short, long = planned("short.json"), planned("long.json")
    assert (short["images_per_example"], long["images_per_example"]) == (1, 2)
    assert short["sequence_length"] < long["sequence_length"]
    assert short["bytes"]["activations"] < long["bytes"]["activations"]
    assert any("longest of 2 conversation(s)" in note for note in long["notes"])
    cut = planned("long.json", max_length=long["sequence_length"] - 5)
    assert cut["sequence_length"] == long["sequence_length"] - 5
    assert any(f"data.max_length {cut['sequence_length']}" in note for note in cut["notes"])


def test_a_vision_tower_meta_tensors_cannot_run_is_left_out_with_a_note(monkeypatch):
    """A family whose vision forward reads data on meta tensors: with its vision tower training, the plan still
    comes, from the language model alone, and says what it left out."""
    import mmpeft.planner.generative_trace as generative_trace

    def reads_data(*args, **kwargs):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    towers = {"name": "lora", "r": 4, "alpha": 8, "towers": ["language", "vision"]}
    language_only = plan_recipe(load_recipe(generative_data("smolvlm")), device="cpu")
    monkeypatch.setattr(generative_trace, "image_features", reads_data)
    planned = plan_recipe(load_recipe(generative_data("smolvlm", towers)), device="cpu")
    assert planned["trainable_params"] > language_only["trainable_params"]
    assert any("idefics3 cannot run on meta tensors (Tensor.item()" in note and "not in the plan" in note
               for note in planned["notes"])
    assert planned["bytes"]["activations"] >= language_only["bytes"]["activations"]


def test_cli_plans_the_generative_recipe(capsys):
    assert main(["plan", "recipes/generative-lora.yaml", "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "LlavaForConditionalGeneration" in out and "1 image of 32 px -> 16 tokens each | sequence " in out
    for expected in ("weights", "gradients", "optimizer state", "activations", "total", "fits in 24 GiB",
                     "note: traced on meta tensors"):
        assert expected in out


def test_compare_grid_of_generative_methods_plans_each():
    data = generative_data("llava")
    del data["method"]
    data["grid"] = {"methods": [{"name": "lora", "r": 4, "towers": ["language", "projector"]}, "full", "zero_shot"],
                    "seeds": [0]}
    plans = plan(data, gpu_memory="24GiB")
    assert [p["method"] for p in plans] == ["lora", "full", "zero_shot"]
    assert 0 < plans[0]["trainable_params"] < plans[1]["trainable_params"] and plans[2]["trainable_params"] == 0
    assert all(p["sequence_length"] == plans[0]["sequence_length"] for p in plans)


def test_generative_hub_id_without_processor_files_is_one_clear_line(tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    from mmpeft.testing import tiny_backbone

    snapshot = tmp_path / "hub" / "models--someorg--vlm" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--someorg--vlm" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--vlm" / "refs" / "main").write_text("a" * 40)
    shutil.copy(tiny_backbone("llava") / "config.json", snapshot / "config.json")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data = generative_data("llava")
    data["backbone"]["id"] = "someorg/vlm"
    with pytest.raises(PlanError, match=r"'someorg/vlm': planning a generative VLM needs its processor files") as e:
        plan(data)
    assert "\n" not in str(e.value)


def test_a_generative_family_the_trace_cannot_run_is_a_plan_error(monkeypatch):
    import mmpeft.planner.generative_trace as generative_trace

    def fails(*args, **kwargs):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr(generative_trace, "trace_run", fails)
    with pytest.raises(PlanError, match=r"family 'llava'.*cannot be traced on meta tensors \(Tensor.item"):
        plan(generative_data("llava"))


@pytest.mark.parametrize("bits", [4, 8])
def test_generative_quantized_weights_match_bitsandbytes(bits):
    from mmpeft.backbones.quantization import weight_bytes

    data = generative_data("llava")
    data["backbone"]["quantization"] = {"bits": bits}
    recipe = load_recipe(data)
    assert plan_recipe(recipe, device="cpu")["bytes"]["weights"] == weight_bytes(built_generative(recipe).model)


def test_a_worst_case_longer_than_the_context_says_so():
    planned = plan_recipe(load_recipe(generative_data("llava", question="What digit is this? " * 120)), device="cpu")
    assert planned["sequence_length"] > 512
    assert any("exceeds the language model's context length (512)" in note and "shorten" in note
               for note in planned["notes"])
