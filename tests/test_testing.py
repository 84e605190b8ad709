"""Tiny offline backbones load through the real Auto classes and behave like usable dual encoders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a mistaken hub id must fail fast, never hang or download

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
)

from mmpeft import testing
from mmpeft.core.io import cache_dir
from mmpeft.tiny import store

CAPTIONS = ["a photo of a cat.", "a photo of a dog.", "a photo of the digit 3."]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.save_tiny_siglip(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> tuple[CLIPModel, CLIPProcessor]:
    return AutoModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)


@pytest.fixture(scope="module")
def siglip(siglip_dir: Path) -> tuple[SiglipModel, SiglipProcessor]:
    return AutoModel.from_pretrained(siglip_dir).eval(), AutoProcessor.from_pretrained(siglip_dir)


def gray_images(n: int, size: int = 8) -> list[Image.Image]:
    """Small grayscale images (as from scikit-learn digits) converted to RGB, each a different pattern."""
    images = []
    for i in range(n):
        values = bytes((17 * (i + 1) * (x + 3 * y)) % 256 for y in range(size) for x in range(size))
        images.append(Image.frombytes("L", (size, size), values).convert("RGB"))
    return images


# --- tokenizer ---------------------------------------------------------------------------------------------------


def test_word_tokenizer_ids_and_specials() -> None:
    tok = testing.build_word_tokenizer()
    assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2, 3]
    assert tok.eos_token_id != 2  # 2 would switch CLIP to argmax-of-ids pooling
    ids = tok("A Photo of the digit 3.").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a", "photo", "of", "the", "digit", "3", "."]
    assert tok.unk_token_id not in ids
    for word in ["zero", "nine", "0", "9", "cat", "dog", "red", "blue", ",", "an", "image", "this", "is"]:
        assert word in tok.get_vocab(), word
    assert tok("a zebra").input_ids == [2, tok.convert_tokens_to_ids("a"), tok.unk_token_id, 3]
    assert tok.model_max_length == 16


def test_word_tokenizer_custom_words_and_truncation() -> None:
    tok = testing.build_word_tokenizer(["Zebra", "giraffe.", "zebra"], model_max_length=5)
    assert len(tok) == 4 + 3  # specials + zebra, giraffe, "."
    assert tok.convert_ids_to_tokens(tok("zebra giraffe.").input_ids) == ["<bos>", "zebra", "giraffe", ".", "<eos>"]
    long = tok("zebra " * 10, truncation=True).input_ids
    assert len(long) == 5 and long[-1] == tok.eos_token_id
    assert (
        testing.build_word_tokenizer("cat dog").get_vocab() == testing.build_word_tokenizer(["cat", "dog"]).get_vocab()
    )
    with pytest.raises(ValueError, match="model_max_length"):
        testing.build_word_tokenizer(model_max_length=2)


# --- saved folders load through the Auto classes --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_folder_layout(kind: str, clip_dir: Path, siglip_dir: Path) -> None:
    folder = clip_dir if kind == "clip" else siglip_dir
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "preprocessor_config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)  # safetensors only
    assert json.loads((folder / "config.json").read_text())["model_type"] == kind


@pytest.mark.parametrize(
    ("kind", "model_cls", "processor_cls", "image_cls"),
    [
        ("clip", CLIPModel, CLIPProcessor, CLIPImageProcessorPil),
        ("siglip", SiglipModel, SiglipProcessor, SiglipImageProcessorPil),
    ],
)
def test_auto_classes_reload(
    kind: str, model_cls: type, processor_cls: type, image_cls: type, clip_dir: Path, siglip_dir: Path
) -> None:
    folder = clip_dir if kind == "clip" else siglip_dir
    model = AutoModel.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model) is model_cls
    assert isinstance(processor, processor_cls)
    assert isinstance(processor.image_processor, image_cls)
    assert isinstance(AutoImageProcessor.from_pretrained(folder), image_cls)
    original = testing.build_word_tokenizer()
    texts = [*CAPTIONS, "Nine RED birds, one blue tree!"]
    assert processor.tokenizer(texts).input_ids == original(texts).input_ids
    assert model.config.text_config.vocab_size == len(original)


def test_image_processor_resizes_normalises_and_converts_gray(clip: tuple[CLIPModel, CLIPProcessor]) -> None:
    _, processor = clip
    ip = processor.image_processor
    assert (ip.size.height, ip.size.width) == (24, 24)
    assert not ip.do_center_crop or (ip.crop_size.height, ip.crop_size.width) == (24, 24)
    assert ip.do_normalize and list(ip.image_mean) == [0.5] * 3 and list(ip.image_std) == [0.5] * 3
    pixels = processor(images=gray_images(2), return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, 24, 24)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0 and pixels.min() < 0 < pixels.max()
    assert torch.equal(pixels[:, 0], pixels[:, 1])  # gray -> RGB keeps channels equal
    non_square = Image.new("RGB", (40, 10), "red")
    assert processor(images=[non_square], return_tensors="pt").pixel_values.shape == (1, 3, 24, 24)


# --- models behave ---------------------------------------------------------------------------------------------------


def test_clip_pools_at_eos(clip: tuple[CLIPModel, CLIPProcessor]) -> None:
    model, processor = clip
    assert model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id
    assert model.config.text_config.eos_token_id not in (2, 49407)
    with torch.no_grad():
        batch = processor(text=CAPTIONS, padding=True, return_tensors="pt")
        feats = model.get_text_features(**batch).pooler_output
        assert feats.shape == (len(CAPTIONS), model.config.projection_dim)
        assert not torch.allclose(feats[0], feats[1], atol=1e-4)  # differing captions, differing embeddings
        single = processor(text=CAPTIONS[:1], return_tensors="pt")
        padded = processor(text=CAPTIONS[:1], padding="max_length", return_tensors="pt")
        assert padded.input_ids.shape[1] > single.input_ids.shape[1]
        a = model.get_text_features(**single).pooler_output
        b = model.get_text_features(**padded).pooler_output
    torch.testing.assert_close(a, b)  # padding does not change the pooled embedding
    torch.testing.assert_close(a, feats[:1])


def test_clip_scores_images_against_texts(clip: tuple[CLIPModel, CLIPProcessor]) -> None:
    model, processor = clip
    with torch.no_grad():
        batch = processor(text=CAPTIONS, images=gray_images(2), padding=True, return_tensors="pt")
        out = model(**batch)
        image_feats = model.get_image_features(pixel_values=batch.pixel_values).pooler_output
    assert out.logits_per_image.shape == (2, len(CAPTIONS))
    assert torch.isfinite(out.logits_per_image).all()
    assert image_feats.shape == (2, model.config.projection_dim)


def test_siglip_scores_a_batch_padded_to_max_length(siglip: tuple[SiglipModel, SiglipProcessor]) -> None:
    model, processor = siglip
    batch = processor(text=CAPTIONS, images=gray_images(2), padding="max_length", return_tensors="pt")
    assert batch.input_ids.shape == (len(CAPTIONS), processor.tokenizer.model_max_length)
    assert processor.tokenizer.model_max_length <= model.config.text_config.max_position_embeddings
    assert batch.pixel_values.shape == (2, 3, 24, 24)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values)
        text = model.get_text_features(input_ids=batch.input_ids).pooler_output
    assert out.logits_per_image.shape == (2, len(CAPTIONS))
    assert torch.isfinite(out.logits_per_image).all()
    assert not torch.allclose(text[0], text[1], atol=1e-4)


# --- determinism, size, speed ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [testing.save_tiny_clip, testing.save_tiny_siglip])
def test_same_seed_same_bytes_other_seed_other_weights(build: Callable[..., Path], tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    a, b, c = build(tmp_path / "a", seed=3), build(tmp_path / "b", seed=3), build(tmp_path / "c", seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    sd_a, sd_b, sd_c = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert sd_a.keys() == sd_b.keys() == sd_c.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_reloaded_state_dicts_match_across_builds(tmp_path: Path) -> None:
    m1 = AutoModel.from_pretrained(testing.save_tiny_clip(tmp_path / "1", seed=7))
    m2 = AutoModel.from_pretrained(testing.save_tiny_clip(tmp_path / "2", seed=7))
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("build", [testing.save_tiny_clip, testing.save_tiny_siglip])
def test_tiny_and_fast(build: Callable[..., Path], tmp_path: Path) -> None:
    start = time.perf_counter()
    folder = build(tmp_path / "m")
    elapsed = time.perf_counter() - start
    n_params = sum(t.numel() for t in load_file(folder / "model.safetensors").values())
    assert 10_000 < n_params < 150_000
    assert elapsed < 2.0


def test_config_builders_and_overrides(tmp_path: Path) -> None:
    config = testing.tiny_clip_config(logit_scale_init_value=1.0, text_config={"hidden_act": "gelu"})
    assert config.logit_scale_init_value == 1.0
    assert config.text_config.hidden_act == "gelu" and config.text_config.hidden_size == 32  # merged, not replaced
    assert config.text_config.eos_token_id == testing.build_word_tokenizer().eos_token_id
    assert config.vision_config.image_size == 24 and config.vision_config.patch_size == 4
    folder = testing.save_tiny_clip(
        tmp_path / "m", image_size=32, hidden=16, layers=1, words=["cat", "dog"], config_overrides={"projection_dim": 8}
    )
    model = AutoModel.from_pretrained(folder)
    assert model.config.vision_config.image_size == 32 and model.config.projection_dim == 8
    assert model.config.text_config.vocab_size == 6 and model.config.text_config.num_hidden_layers == 1
    processor = AutoProcessor.from_pretrained(folder)
    assert processor(images=gray_images(1), return_tensors="pt").pixel_values.shape == (1, 3, 32, 32)
    with torch.no_grad():
        batch = processor(text=["cat", "dog"], images=gray_images(1), padding=True, return_tensors="pt")
        assert model(**batch).logits_per_image.shape == (1, 2)


# --- cached builds ---------------------------------------------------------------------------------------------------


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tiny_backbone_builds_once(kind: str, cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = testing.tiny_backbone(kind, seed=1)
    assert path == cache_dir("tiny-backbones", f"{kind}-1")
    assert path.is_relative_to(cache_root)
    assert type(AutoModel.from_pretrained(path)).__name__ == {"clip": "CLIPModel", "siglip": "SiglipModel"}[kind]
    weights = (path / "model.safetensors").read_bytes()

    def no_rebuild(*args: object, **kwargs: object) -> Path:
        raise AssertionError("cached backbone was rebuilt")

    monkeypatch.setitem(store._BUILDERS, kind, no_rebuild)
    assert testing.tiny_backbone(kind, seed=1) == path
    assert (path / "model.safetensors").read_bytes() == weights
    assert [p.name for p in path.parent.iterdir()] == [f"{kind}-1"]  # no temp folders left behind


def test_tiny_backbone_never_leaves_a_half_folder(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def dies_midway(out_dir: Path, **kwargs: object) -> Path:
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setitem(store._BUILDERS, "clip", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        testing.tiny_backbone("clip", seed=0)
    root = cache_root / "tiny-backbones"
    assert list(root.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("MMPEFT_CACHE", str(cache_root))
    assert (testing.tiny_backbone("clip", seed=0) / "model.safetensors").is_file()


def test_tiny_backbone_replaces_empty_or_stale_folders(cache_root: Path) -> None:
    empty = cache_dir("tiny-backbones", "clip-0")  # cache_dir creates the folder: it must not count as a build
    assert empty.is_dir() and not any(empty.iterdir())
    path = testing.tiny_backbone("clip", seed=0)
    assert (path / "model.safetensors").is_file()

    stale = cache_dir("tiny-backbones", "siglip-0")
    (stale / "config.json").write_text("{}")  # a half folder from some older, non-atomic writer
    path = testing.tiny_backbone("siglip", seed=0)
    assert type(AutoModel.from_pretrained(path)) is SiglipModel
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip-0", "siglip-0"]


def test_tiny_backbone_rejects_unknown_kind(cache_root: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny backbone kind"):
        testing.tiny_backbone("blip", seed=0)  # type: ignore[arg-type]
