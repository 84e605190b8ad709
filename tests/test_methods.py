"""Every method on tiny CLIP and SigLIP, driven by one table of cases (method config x backbone kind).

For each case: exactly the intended parameters train (count = a formula over the tiny config), one optimisation
step changes only them, the wrapped model equals the base where the method starts at identity, save -> load gives
identical logits, and a short run on a fixed batch lowers the training loss.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpeft.backbones import load_backbone
from mmpeft.data import LabelSet
from mmpeft.methods import METHODS, count_parameters
from mmpeft.objectives import Classification
from mmpeft.specs import BackboneSpec, Recipe
from mmpeft.testing import tiny_backbone

LABELS = LabelSet(["cat", "dog", "bird", "fish"])  # default template "a photo of a {label}."
KINDS = ("clip", "siglip")


def layers(cfg) -> int:
    return cfg.num_hidden_layers


def per_tower(kind_cfg, towers, per_layer: Callable) -> int:
    return sum(layers(c) * per_layer(c.hidden_size, c.intermediate_size) for c in tower_configs(kind_cfg, towers))


def tower_configs(cfg, towers=("vision", "text")) -> list:
    return [cfg.vision_config if t == "vision" else cfg.text_config for t in towers]


def bitfit_count(cfg, kind: str, layer_norm: bool) -> int:
    """Biases: q, k, v, out, fc1, fc2 and two norms per layer (7D + I), plus each tower's own extras."""
    v, t = cfg.vision_config, cfg.text_config
    count = per_tower(cfg, ("vision", "text"), lambda d, i: 7 * d + i)
    if kind == "clip":  # text final norm; vision pre- and post-norm
        count += t.hidden_size + 2 * v.hidden_size
        norms = 2 * layers(t) * t.hidden_size + t.hidden_size + 2 * layers(v) * v.hidden_size + 2 * v.hidden_size
    else:  # text final norm + head; vision post-norm, patch conv, attention-pooling head (in_proj 3D, out D, norm D,
        # fc1 I, fc2 D)
        count += t.hidden_size + t.projection_size
        count += v.hidden_size + v.hidden_size + (3 + 1 + 1 + 1) * v.hidden_size + v.intermediate_size
        norms = 2 * layers(t) * t.hidden_size + t.hidden_size + 2 * layers(v) * v.hidden_size + 2 * v.hidden_size
    return count + (norms if layer_norm else 0)


def feature_dim(cfg) -> int:
    return getattr(cfg, "projection_dim", None) or cfg.text_config.projection_size


@dataclass(frozen=True)
class Case:
    config: dict
    count: Callable  # (hf config, kind) -> trainable parameters
    names: str  # regex every trainable parameter name matches
    adds: bool = True  # new parameters (vs. unfreezing existing ones)
    identity: bool = True  # the wrapped model starts exactly as the base
    lr: float = 1e-2


CASES: dict[str, Case] = {
    "zero_shot": Case({"name": "zero_shot"}, lambda c, k: 0, r"^$", adds=False),
    "full": Case({"name": "full"}, lambda c, k: None, r".", adds=False, lr=1e-3),
    "lora": Case({"name": "lora", "r": 4}, lambda c, k: per_tower(c, ("vision", "text"), lambda d, i: 4 * 4 * 2 * d),
                 r"\.lora_[AB]\."),
    "lora_vision": Case({"name": "lora", "r": 4, "towers": ["vision"]},
                        lambda c, k: per_tower(c, ("vision",), lambda d, i: 4 * 4 * 2 * d),
                        r"vision_model\..*\.lora_[AB]\."),
    "dora": Case({"name": "lora", "r": 4, "use_dora": True},
                 lambda c, k: per_tower(c, ("vision", "text"), lambda d, i: 4 * (4 * 2 * d + d)),
                 r"\.lora_(A|B|magnitude_vector)\."),
    "rslora": Case({"name": "lora", "r": 4, "use_rslora": True},
                   lambda c, k: per_tower(c, ("vision", "text"), lambda d, i: 4 * 4 * 2 * d), r"\.lora_[AB]\."),
    "ia3": Case({"name": "ia3"}, lambda c, k: per_tower(c, ("vision", "text"), lambda d, i: 2 * d + i), r"\.ia3_l\."),
    "houlsby": Case({"name": "bottleneck", "placement": "houlsby", "reduction_factor": 4},
                    lambda c, k: per_tower(c, ("vision", "text"), lambda d, i: 2 * (2 * d * (d // 4) + d // 4 + d)),
                    r"\.(self_attn|mlp)\.adapter\.(down|up)\."),
    "pfeiffer": Case({"name": "bottleneck", "placement": "pfeiffer", "reduction_factor": 4},
                     lambda c, k: per_tower(c, ("vision", "text"), lambda d, i: 2 * d * (d // 4) + d // 4 + d),
                     r"\.mlp\.adapter\.(down|up)\."),
    "bitfit": Case({"name": "bitfit"}, lambda c, k: bitfit_count(c, k, False), r"_?bias$", adds=False),
    "bitfit_ln": Case({"name": "bitfit", "layer_norm": True}, lambda c, k: bitfit_count(c, k, True),
                      r"(_?bias|(norm\d?|layrnorm)\.weight)$", adds=False),
    "coop": Case({"name": "coop", "n_ctx": 4, "init": "a photo of a"}, lambda c, k: 4 * c.text_config.hidden_size,
                 r"^text_prompts\.ctx$"),
    "coop_class": Case({"name": "coop", "n_ctx": 4, "class_specific": True},
                       lambda c, k: len(LABELS) * 4 * c.text_config.hidden_size, r"^text_prompts\.ctx$"),
    "vpt": Case({"name": "vpt", "n_tokens": 4}, lambda c, k: 4 * c.vision_config.hidden_size,
                r"vision_model\.embeddings\.vpt\.tokens$", identity=False, lr=5e-2),
    "linear_probe": Case({"name": "linear_probe"}, lambda c, k: (feature_dim(c) + 1) * len(LABELS), r"^head\."),
}
PARAMS = [pytest.param(case, kind, id=f"{case}-{kind}") for case in CASES for kind in KINDS]
TRAINING = [p for p in PARAMS if METHODS.get(CASES[p.values[0]].config["name"]).trains]



@pytest.fixture(scope="module")
def bases() -> dict:
    return {kind: load_backbone(BackboneSpec(id=str(tiny_backbone(kind)))) for kind in KINDS}


@pytest.fixture(scope="module")
def batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(8, 3, 24, 24, generator=generator), "labels": torch.arange(8) % len(LABELS)}


def wrapped(bases: dict, case: str, kind: str, seed: int = 0):
    backbone = copy.deepcopy(bases[kind])
    config = CASES[case].config
    method = METHODS.get(config["name"])()
    spec = method.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    torch.manual_seed(seed)
    method.apply(backbone, spec, LABELS)
    return backbone, method, spec


def logits(backbone, batch: dict) -> torch.Tensor:
    backbone.eval()
    with torch.no_grad():
        return Classification(backbone, LABELS).logits(batch)


def train(backbone, batch: dict, steps: int, lr: float) -> list[float]:
    backbone.train()
    objective = Classification(backbone, LABELS)
    optimizer = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = objective.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_every_registered_method_has_a_case() -> None:
    covered = {case.config["name"] for case in CASES.values()}
    assert covered == set(METHODS.names())


@pytest.mark.parametrize(("case", "kind"), PARAMS)
def test_exactly_the_intended_parameters_train(bases: dict, case: str, kind: str) -> None:
    base_total = count_parameters(bases[kind])["total"]
    backbone, _, _ = wrapped(bases, case, kind)
    counts = count_parameters(backbone)
    trainable = [name for name, p in backbone.named_parameters() if p.requires_grad]
    expected = CASES[case].count(backbone.base_model.config, kind)
    expected = base_total if expected is None else expected  # full fine-tuning
    assert counts["trainable"] == expected
    assert counts["total"] == base_total + (expected if CASES[case].adds else 0)
    assert all(re.search(CASES[case].names, name) for name in trainable), trainable


@pytest.mark.parametrize(("case", "kind"), TRAINING)
def test_one_step_changes_only_trainable_parameters(bases: dict, batch: dict, case: str, kind: str) -> None:
    backbone, _, _ = wrapped(bases, case, kind)
    before = {name: p.detach().clone() for name, p in backbone.named_parameters()}
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    train(backbone, batch, steps=1, lr=CASES[case].lr)
    changed = {name for name, p in backbone.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable


@pytest.mark.parametrize(("case", "kind"), [p for p in PARAMS if CASES[p.values[0]].identity])
def test_wrapped_model_starts_as_the_base(bases: dict, batch: dict, case: str, kind: str) -> None:
    """coop starts from "a photo of a" with n_ctx 4, the labels' template, so it is the zero-shot model too."""
    base = logits(copy.deepcopy(bases[kind]), batch)
    backbone, _, _ = wrapped(bases, case, kind)
    torch.testing.assert_close(logits(backbone, batch), base, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("case", "kind"), TRAINING)
def test_save_then_load_gives_identical_logits(bases: dict, batch: dict, tmp_path: Path, case: str,
                                               kind: str) -> None:
    backbone, method, spec = wrapped(bases, case, kind)
    train(backbone, batch, steps=2, lr=CASES[case].lr)
    trained = logits(backbone, batch)
    method.save(backbone, spec, tmp_path)
    assert json.loads((tmp_path / "method.json").read_text())["method"]["name"] == spec.name
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    saved = [f for f in tmp_path.iterdir() if f.suffix == ".safetensors"]
    assert len(saved) == 1 and not list(tmp_path.glob("*.bin"))
    if case != "full":  # full fine-tuning saves a whole model folder; every other method only what trained
        assert len(load_file(str(saved[0]))) == len(trainable)
    fresh, _, _ = wrapped(bases, case, kind, seed=1)  # a different init, overwritten by the load
    method.load(fresh, spec, tmp_path)
    assert torch.equal(logits(fresh, batch), trained)


@pytest.mark.parametrize(("case", "kind"), TRAINING)
def test_short_training_lowers_the_loss(bases: dict, batch: dict, case: str, kind: str) -> None:
    backbone, _, _ = wrapped(bases, case, kind)
    losses = train(backbone, batch, steps=5, lr=CASES[case].lr)
    assert losses[-1] < losses[0], losses


# --- errors that name the field and the value -----------------------------------------------------------------------


def apply(bases: dict, config: dict, labels: LabelSet | None = LABELS, kind: str = "clip") -> None:
    cls = METHODS.get(config["name"])
    cls().apply(copy.deepcopy(bases[kind]), cls.Config(**config), labels)


@pytest.mark.parametrize(("config", "labels", "message"), [
    ({"name": "coop", "n_ctx": 16}, LABELS, r"method\.n_ctx: 16 .* 16 positions; use n_ctx <= 13"),
    ({"name": "coop", "n_ctx": 2, "init": "a photo of a"}, LABELS, r"method\.init: 'a photo of a' is 4 tokens"),
    ({"name": "coop", "n_ctx": 2, "init": None, "class_specific": True}, None, r"'coop' needs the task's label set"),
    ({"name": "linear_probe"}, None, r"'linear_probe' needs the task's label set"),
    ({"name": "bottleneck", "reduction_factor": 64}, LABELS, r"method\.reduction_factor: 64 .* hidden size 32"),
])
def test_unusable_settings_fail_with_the_field(bases: dict, config: dict, labels, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply(bases, config, labels)


def test_config_checks_name_the_field() -> None:
    from mmpeft.core.schema import build

    for config, message in [({"name": "bottleneck", "reduction_factor": 0}, r"method\.reduction_factor: 0 is out of"),
                            ({"name": "vpt", "n_tokens": 0}, r"method\.n_tokens: 0 is out of range; it must be >= 1"),
                            ({"name": "ia3", "feedforward_modules": ("fc2",)}, r"method\.feedforward_modules is set")]:
        problems: list[str] = []
        build(METHODS.get(config["name"]).Config, config, "method", problems)  # ranges: checked by the schema
        assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_prompt_methods_refuse_generative_backbones_and_say_what_is_planned() -> None:
    for name in ("coop", "vpt"):
        cls = METHODS.get(name)
        recipe = Recipe(method=cls.Config(), backbone=BackboneSpec(family="generative"))
        (problem,) = cls.check(recipe)
        assert f"{name!r} does not apply to backbone family 'generative'" in problem and "later version" in problem


def test_ia3_targets_come_from_the_backbone(bases: dict) -> None:
    backbone, _, _ = wrapped(bases, "ia3", "siglip")
    scaled = {name.split(".ia3_l")[0].split("base_model.model.")[-1] for name, _ in backbone.named_parameters()
              if ".ia3_l" in name}
    assert {"vision_model.encoder.layers.0.mlp.fc2", "text_model.encoder.layers.1.self_attn.k_proj"} <= scaled
    assert not any("head" in name or "q_proj" in name for name in scaled)  # not SigLIP's pooling head, not queries
