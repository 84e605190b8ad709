"""The generative family x feature matrix: every family users bring (LLaVA, Idefics3 with and without image
splitting, Qwen2-VL, Qwen2.5-VL, PaliGemma, Gemma3), each on its tiny random build, through every feature.

Columns: LoRA targets per tower, QLoRA 4-bit on CPU, a CSV of images from 20x40 to 100x30 px (batches of different
crop and token counts), `eval.generate`, in-context rows (all three strategies), and an adapter-only export that
reloads. Merged exports are left out here: their verification for generative runs is another issue's work.
One training run per family (module-scoped) feeds several columns, so the matrix stays fast.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import mmpeft
from mmpeft.artifacts import export, load_adapter
from mmpeft.backbones import load_backbone
from mmpeft.backbones.scoring import score_answers
from mmpeft.core.schema import RecipeError
from mmpeft.methods import METHODS
from mmpeft.methods.lora import LoraSpec
from mmpeft.objectives import make_objective
from mmpeft.runs.icl import run_icl_sweep
from mmpeft.runs.recipe import load_recipe
from mmpeft.specs import BackboneSpec, QuantizationSpec
from mmpeft.testing import tiny_backbone
from mmpeft.tiny.store import GENERATIVE_KINDS

# Module-name parts LoRA must reach in each tower, per family.
TOWER_MODULES = {
    "llava": {"language": "language_model", "vision": "vision_tower", "projector": "multi_modal_projector"},
    "idefics3": {"language": "text_model", "vision": "vision_model", "projector": "connector"},
    "qwen2vl": {"language": "language_model", "vision": "visual.blocks", "projector": "visual.merger"},
    "qwen25vl": {"language": "language_model", "vision": "visual.blocks", "projector": "visual.merger"},
    "paligemma": {"language": "language_model", "vision": "vision_tower", "projector": "multi_modal_projector"},
    "gemma3": {"language": "language_model", "vision": "vision_tower"},  # its projector is a bare weight matrix
}
TOWER_MODULES["smolvlm"] = TOWER_MODULES["idefics3"]
SIZES = [(20, 40), (100, 30), (32, 32), (64, 20), (40, 40), (30, 90), (24, 24), (80, 60)]  # width x height
COLORS = {"red": (220, 30, 30), "blue": (40, 50, 220)}


def towers_of(kind: str) -> list[str]:
    return list(TOWER_MODULES[kind])


@pytest.fixture(scope="module")
def mixed_csv(tmp_path_factory):
    """A CSV of 16 noisy two-colour images, no two neighbours the same size."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        label = "red" if i % 2 else "blue"
        width, height = SIZES[i % len(SIZES)]
        pixels = np.clip(np.array(COLORS[label]) + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
        rows.append({"image": f"{i:02d}.png", "label": label})
    with open(root / "rows.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "rows.csv"


def recipe(kind: str, table, out, **changes) -> dict:
    base = {"name": f"family-{kind}", "backbone": {"id": str(tiny_backbone(kind))},
            "data": {"source": "csv", "path": str(table), "question": "What colour is this image?",
                     "split": {"val": 0.0, "test": 0.25}},
            "method": {"name": "lora", "r": 4, "alpha": 8, "towers": towers_of(kind)},
            "train": {"objective": "generative", "epochs": 1, "batch_size": 6, "lr": 0.01, "warmup_ratio": 0.0},
            "eval": {"batch_size": 8, "generate": True, "max_new_tokens": 2},
            "output": {"dir": str(out), "name": kind}}
    return {**base, **changes}


@pytest.fixture(scope="module", params=GENERATIVE_KINDS)
def family_run(request, mixed_csv, tmp_path_factory):
    """One LoRA run on every tower, 1 epoch on the mixed-size CSV, with zero-shot and trained generation."""
    kind = request.param
    out = tmp_path_factory.mktemp(f"runs-{kind}")
    mmpeft.run(recipe(kind, mixed_csv, out))
    return kind, out / kind


def test_lora_reaches_every_tower(family_run):
    kind, run_dir = family_run
    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        names = list(saved.keys())
    for tower, part in TOWER_MODULES[kind].items():
        assert any(part in name and "lora_A" in name for name in names), f"{kind}: no LoRA on the {tower} ({part})"


def test_mixed_sizes_train_score_and_generate(family_run):
    kind, run_dir = family_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["n"] == 4 and 0 <= metrics["test"]["accuracy"] <= 1
    assert set(metrics["answers"]) == {"zero_shot", "test"}  # eval.generate, before and after training
    assert metrics["answers"]["test"]["n"] == 4 and 0 <= metrics["answers"]["test"]["exact_match"] <= 1


def test_adapter_export_verifies_and_reloads(family_run, tmp_path):
    kind, run_dir = family_run
    manifest = export(run_dir, tmp_path / "export", how="adapter")  # verified against the trained model
    assert manifest["kind"] == "adapter"
    backbone = load_adapter(tmp_path / "export")
    assert backbone.model_type == load_backbone(BackboneSpec(id=str(tiny_backbone(kind)))).model_type
    trained = {n for n, _ in backbone.model.named_parameters() if "lora_A" in n}
    assert all(any(part in n for n in trained) for part in TOWER_MODULES[kind].values())


def test_merged_export_verifies_and_loads_in_plain_transformers(family_run, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kind, run_dir = family_run
    manifest = export(run_dir, tmp_path / "merged", how="merged")  # raises unless it scores as the trained model does
    assert manifest["kind"] == "merged"
    from transformers.utils import is_torchvision_available

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert not any("lora_" in name for name, _ in model.named_parameters())
    saved = json.loads((tmp_path / "merged" / "processor_config.json").read_text())["processor_class"]
    assert "ImageOnly" not in saved  # the stock class name, which plain transformers knows
    if kind.startswith("qwen") and not is_torchvision_available():
        return  # the stock Qwen processor insists on a video processor, which needs torchvision (absent here)
    assert AutoProcessor.from_pretrained(tmp_path / "merged").image_processor is not None


def test_in_context_rows_for_every_strategy(family_run, mixed_csv, tmp_path):
    kind, _ = family_run
    rows = run_icl_sweep(recipe(kind, mixed_csv, tmp_path, method="zero_shot"), shots=(0, 2), seeds=(0,),
                         max_queries=3)
    assert [r["status"] for r in rows] == ["ok"] * 6, [r.get("error") for r in rows]
    assert {r["strategy"] for r in rows if r["shots"] == 2} == {"random", "balanced", "nearest"}
    assert all(r["n"] == 3 for r in rows)


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", GENERATIVE_KINDS)
def test_padded_batches_score_like_single_images(kind):
    """Images of different shapes (different crop or token counts) batched together score as each one alone."""
    backbone = load_backbone(BackboneSpec(id=str(tiny_backbone(kind))))
    images = [[image(i, size)] for i, size in enumerate(SIZES[:3])]
    prompt = backbone.prompt_text("What colour is this image?")
    answers = [backbone.answer_ids("red"), backbone.answer_ids("blue")]
    with torch.no_grad():
        batched = score_answers(backbone, [prompt] * 3, images, answers)
        alone = torch.cat([score_answers(backbone, [prompt], [one], answers) for one in images])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    vectors = backbone.image_embeddings([one[0] for one in images])  # one vector per image, not per call
    assert vectors.shape[0] == 3 and not torch.allclose(vectors[0], vectors[1])


class Labels:
    names = ["red", "blue"]


@pytest.mark.parametrize("kind", GENERATIVE_KINDS)
def test_qlora_4bit_step(kind):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    backbone = load_backbone(BackboneSpec(id=str(tiny_backbone(kind)), quantization=QuantizationSpec(bits=4)))
    assert any(type(m).__name__ == "Linear4bit" for m in backbone.model.modules())
    torch.manual_seed(0)
    METHODS.get("lora")().apply(backbone, LoraSpec(r=4, alpha=8))
    before = {n: p.detach().clone() for n, p in backbone.named_parameters() if "lora_B" in n}
    items = [{"image": image(i, size), "label": i % 2, "index": i} for i, size in enumerate(SIZES[:2])]
    from mmpeft.data import collate_images

    batch = collate_images(backbone.preprocess)(items)
    objective = make_objective("generative", backbone, Labels())
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-2)
    loss = objective.loss(batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, before[n]) for n, p in backbone.named_parameters() if n in before)


def test_gemma3_projector_towers_are_refused_at_recipe_time(mixed_csv, tmp_path):
    for towers in (["projector"], ["all"]):
        with pytest.raises(RecipeError) as caught:
            load_recipe(recipe("gemma3", mixed_csv, tmp_path, method={"name": "lora", "towers": towers}))
        message = str(caught.value)
        assert "method.towers: 'projector' matches no linear layer of Gemma3ForConditionalGeneration" in message
        assert "mm_input_projection_weight" in message and "method.name: full" in message
    load_recipe(recipe("gemma3", mixed_csv, tmp_path))  # language + vision: fine


@pytest.mark.parametrize("kind, stock", [("qwen2vl", "Qwen2VLProcessor"), ("qwen25vl", "Qwen2_5_VLProcessor")])
def test_qwen_folders_name_the_stock_processor_and_load_without_it(kind, stock, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_backbone(kind), tmp_path / "as-saved")
    for name in ("processor_config.json", "tokenizer_config.json"):  # written as real checkpoints write them
        assert json.loads((folder / name).read_text())["processor_class"] == stock
    backbone = load_backbone(BackboneSpec(id=str(folder)))
    assert backbone.image_processor is not None and type(backbone.processor).__name__.startswith(stock[:-9])
    for name in ("processor_config.json", "tokenizer_config.json"):  # a folder that names no processor class
        settings = json.loads((folder / name).read_text())
        settings.pop("processor_class")
        (folder / name).write_text(json.dumps(settings))
    bare = load_backbone(BackboneSpec(id=str(folder)))
    assert bare.image_processor is not None
    bare.processor.save_pretrained(tmp_path / "resaved")  # what exports write: the stock name again
    for name in ("processor_config.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / "resaved" / name).read_text())["processor_class"] == stock


def test_a_failing_strategy_fails_only_its_rows(mixed_csv, tmp_path, monkeypatch):
    from mmpeft.backbones.generative import GenerativeBackbone
    from mmpeft.evaluation.icl import write_outputs

    def no_embeddings(self, images, batch_size=32):
        raise RuntimeError("embeddings broke")

    monkeypatch.setattr(GenerativeBackbone, "image_embeddings", no_embeddings)
    rows = run_icl_sweep(recipe("llava", mixed_csv, tmp_path, method="zero_shot"), shots=(0, 1), seeds=(0,),
                         max_queries=3)
    status = {(r["strategy"], r["shots"]): r["status"] for r in rows}
    assert status == {("random", 0): "ok", ("balanced", 0): "ok", ("nearest", 0): "ok", ("random", 1): "ok",
                      ("balanced", 1): "ok", ("nearest", 1): "failed"}
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["error"] == "RuntimeError: embeddings broke" and "accuracy" not in failed
    write_outputs(tmp_path / "icl", rows, "broken")  # the table and plot skip the failed row and list it
    table = (tmp_path / "icl" / "icl.md").read_text()
    assert "- nearest k=1 seed 0: RuntimeError: embeddings broke" in table
