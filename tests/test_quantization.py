"""4/8-bit loading on CPU (bitsandbytes, for checking only): bnb layers, a LoRA step that lowers the loss, a smaller
footprint, the refusals at recipe validation, and the README support table matching the code."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mmpeft.backbones import load_backbone, quantization
from mmpeft.core.io import PROJECT_ROOT
from mmpeft.core.schema import RecipeError
from mmpeft.data import LabelSet
from mmpeft.methods import METHODS, support
from mmpeft.objectives import Classification
from mmpeft.runs.recipe import load_recipe
from mmpeft.specs import BackboneSpec, QuantizationSpec, Recipe
from mmpeft.testing import tiny_backbone

LABELS = LabelSet(["cat", "dog", "bird", "fish"])
BNB_LAYERS = {4: "Linear4bit", 8: "Linear8bitLt"}



def load(bits: int | None):
    quant = QuantizationSpec(bits=bits) if bits else None
    return load_backbone(BackboneSpec(id=str(tiny_backbone("clip")), quantization=quant))


def test_bnb_config_maps_every_field() -> None:
    four = quantization.bnb_config(QuantizationSpec(bits=4, quant_type="fp4", double_quant=False,
                                                    compute_dtype="bfloat16"))
    assert four.load_in_4bit and not four.load_in_8bit
    assert (four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == ("fp4", False)
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    eight = quantization.bnb_config(QuantizationSpec(bits=8))
    assert eight.load_in_8bit and not eight.load_in_4bit


@pytest.mark.parametrize(("config", "bits"), [
    pytest.param({"name": "lora", "r": 4}, 4, id="lora-4bit"),
    pytest.param({"name": "lora", "r": 4}, 8, id="lora-8bit"),
    pytest.param({"name": "bitfit"}, 4, id="bitfit-4bit"),  # biases of Linear4bit stay fp32 and train
    pytest.param({"name": "bottleneck", "reduction_factor": 4}, 8, id="houlsby-8bit"),
])
def test_methods_train_on_a_quantized_base(config: dict, bits: int) -> None:
    backbone = load(bits)
    layers = backbone.encoder_layers("vision") + backbone.encoder_layers("text")
    assert all(type(layer.self_attn.q_proj).__name__ == BNB_LAYERS[bits] for layer in layers)
    assert all(type(layer.mlp.fc2).__name__ == BNB_LAYERS[bits] for layer in layers)
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(8, 3, 24, 24, generator=generator), "labels": torch.arange(8) % 4}
    objective = Classification(backbone, LABELS)
    backbone.eval()
    with torch.no_grad():  # what the zero-shot evaluation does before training: must not break training after it
        objective.logits(batch)
    method = METHODS.get(config["name"])
    method().apply(backbone, method.Config(**config), LABELS)
    first_layer = [p for name, p in backbone.named_parameters()
                   if p.requires_grad and "vision_model.encoder.layers.0." in name]
    assert first_layer
    backbone.train()
    optimizer = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = objective.loss(batch)
        loss.backward()
        assert all(p.grad is not None for p in first_layer)  # gradients reach through the quantized layers
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_quantized_footprint_is_smaller_and_counts_quant_state() -> None:
    fp32, eight, four = load(None), load(8), load(4)
    plain = {b: sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
             for b, m in ((32, fp32), (8, eight), (4, four))}
    assert quantization.weight_bytes(fp32) == plain[32]
    assert quantization.weight_bytes(four) > plain[4]  # block scales and codes live outside parameters()
    assert quantization.weight_bytes(eight) > plain[8]  # one fp32 scale per output row
    assert quantization.weight_bytes(four) < quantization.weight_bytes(fp32)
    assert quantization.weight_bytes(eight) < quantization.weight_bytes(fp32)
    linear = quantization.weight_bytes(four, linear_only=True) / quantization.weight_bytes(fp32, linear_only=True)
    assert linear < 0.5  # tiny layers carry per-layer code tables; the benchmark's 25M CLIP gets ~0.15


def test_cpu_warns_once_in_one_line(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "_warned_cpu", False)
    monkeypatch.setattr(quantization, "cuda_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="mmpeft"):
        load(4)
        load(4)
    warnings = [r.getMessage() for r in caplog.records if "for checking only" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]


def quantized_recipe(method: str, bits: int) -> dict:
    return {"method": method, "backbone": {"id": "mmpeft-demo/tiny-clip", "quantization": {"bits": bits}}}


@pytest.mark.parametrize("bits", [4, 8])
def test_full_fine_tuning_on_a_quantized_base_fails_validation_with_alternatives(bits: int) -> None:
    with pytest.raises(RecipeError) as error:
        load_recipe(quantized_recipe("full", bits))
    message = str(error.value)
    assert f"'full' cannot run on a {bits}-bit backbone (backbone.quantization.bits: {bits})" in message
    assert "lora" in message and "bitfit" in message and "remove backbone.quantization" in message


def test_dora_on_8bit_is_refused_on_cpu_only() -> None:
    lora = METHODS.get("lora")
    recipe = Recipe(method=lora.Config(use_dora=True), backbone=BackboneSpec(quantization=QuantizationSpec(bits=8)))
    (problem,) = lora.check(recipe, cuda=False)
    assert "method.use_dora: true on an 8-bit backbone needs CUDA" in problem
    assert lora.check(recipe, cuda=True) == []


def test_missing_bitsandbytes_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecipeError, match=r"backbone\.quantization\.bits: 4-bit loading needs bitsandbytes"):
        load_recipe(quantized_recipe("lora", 4))


def test_readme_methods_table_is_generated_from_the_code() -> None:
    readme = (Path(PROJECT_ROOT) / "README.md").read_text()
    section = support.readme_section(readme)
    assert section is not None, f"README.md lacks the markers {support.MARKERS}"
    assert section == support.render_support_table(), (
        "README's methods table is stale: run "
        "`python -c 'from mmpeft.methods import support; support.main()'`")
