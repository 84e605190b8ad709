"""The demo backbone `mmpeft-demo/digits-clip`: an ordinary Hugging Face folder that tells the workbench's story.

It is pre-trained at most once per test run (the session fixture `digits_clip_dir`; the cache is $MMPEFT_CACHE,
which conftest points inside the checkout), then: high zero-shot accuracy on upright held-out digits, low on
rotated ones, and LoRA on 16 rotated shots per class recovers much of the gap (the shipped quickstart, run once).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, CLIPModel

import mmpeft
from mmpeft.backbones import load_backbone
from mmpeft.core.io import PROJECT_ROOT
from mmpeft.data import load_data, load_image
from mmpeft.runs.demo import CHILD_PRELUDE, MARKER
from mmpeft.specs import BackboneSpec, DataSpec

CAPTIONS = ["a photo of the digit three.", "a handwritten seven.", "a scan of the number zero."]


@pytest.fixture(scope="module")
def quickstart(digits_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """The shipped quickstart recipe, as a user runs it (zero-shot, LoRA on 16 rotated shots, evaluation)."""
    out = tmp_path_factory.mktemp("quickstart")
    metrics = mmpeft.run(PROJECT_ROOT / "recipes" / "quickstart.yaml", {"output.dir": str(out), "output.name": "q"})
    return metrics, out / "q"


def plain_embeddings(model: CLIPModel, processor, images: list, texts: list[str]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return image, text.pooler_output


def test_loads_with_plain_transformers_and_round_trips_to_identical_embeddings(digits_clip_dir: Path,
                                                                                 tmp_path: Path) -> None:
    model = CLIPModel.from_pretrained(digits_clip_dir).eval()
    processor = AutoProcessor.from_pretrained(digits_clip_dir)
    assert sum(p.numel() for p in model.parameters()) == 267_649
    images = [load_image(e.image) for e in load_data(DataSpec(subset="heldout"), seed=0).test[:6]]
    image, text = plain_embeddings(model, processor, images, CAPTIONS)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = plain_embeddings(CLIPModel.from_pretrained(tmp_path).eval(), AutoProcessor.from_pretrained(tmp_path),
                             images, CAPTIONS)
    assert torch.equal(image, again[0]) and torch.equal(text, again[1])
    backbone = load_backbone(BackboneSpec(id="mmpeft-demo/digits-clip")).eval()  # the same folder through mmpeft
    with torch.no_grad():
        ours = backbone.encode_images(backbone.preprocess(images))
        ours_text = backbone.encode_texts(**backbone.tokenize(CAPTIONS))
    torch.testing.assert_close(ours, torch.nn.functional.normalize(image, dim=-1))
    torch.testing.assert_close(ours_text, torch.nn.functional.normalize(text, dim=-1))


def test_build_records_held_out_zero_shot_accuracy(digits_clip_dir: Path) -> None:
    """Measured on all 719 held-out digits by the pre-training run itself."""
    accuracy = json.loads((digits_clip_dir / MARKER).read_text())["heldout_accuracy"]
    assert accuracy["none"] >= 0.9 and accuracy["rot90"] <= 0.3 and accuracy["invert"] <= 0.3
    assert (digits_clip_dir / "pretrain-report.md").is_file()


def test_zero_shot_high_upright_low_rotated(quickstart: tuple[dict, Path]) -> None:
    shifts = quickstart[0]["zero_shot"]["shifts"]
    assert shifts["none"]["accuracy"] >= 0.9
    assert shifts["rot90"]["accuracy"] <= 0.3


def test_lora_on_16_rotated_shots_lifts_rot90_accuracy(quickstart: tuple[dict, Path]) -> None:
    metrics, run_dir = quickstart
    assert metrics["data"]["shots"] == 16 and metrics["data"]["shifts"] == ["rot90"]
    assert metrics["test"]["accuracy"] >= metrics["zero_shot"]["accuracy"] + 0.3
    report = (run_dir / "report.md").read_text()
    assert "| shift | zero-shot | after training | change |" in report and "| rot90 |" in report


def test_the_pretraining_child_prints_no_progress_bars(tmp_path: Path) -> None:
    """The first quickstart run pre-trains in a child process; its save printed transformers' "Writing model shards"
    bar into the user's terminal (the parent's quiet_dependencies does not reach a child)."""
    import subprocess
    import sys

    code = CHILD_PRELUDE + ("from transformers import CLIPTextConfig, CLIPTextModel; "
                            "CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, "
                            "num_attention_heads=2, vocab_size=10)).save_pretrained(sys.argv[1])")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Writing model shards" not in done.stderr + done.stdout and (tmp_path / "model" / "config.json").is_file()
