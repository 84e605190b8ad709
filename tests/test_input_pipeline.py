"""The input pipeline: the decoded-image cache changes no result, worker counts change no batch, stale and
oversized caches are caught, and generative processor outputs are reused."""

from __future__ import annotations

import logging
import os
import time
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

import mmpeft
from mmpeft.backbones import load_backbone
from mmpeft.core.schema import RecipeError
from mmpeft.data import DataError, Example, ImageDataset
from mmpeft.data import image_cache as image_cache_module
from mmpeft.data import loader as loader_module
from mmpeft.data.image_cache import ImageCache
from mmpeft.data.loader import EpochLoader, LoaderSettings, fill_cache, loader_settings, make_loader
from mmpeft.evaluation import predict
from mmpeft.runs.recipe import load_recipe
from mmpeft.specs import AugmentSpec, BackboneSpec

AUGMENT = AugmentSpec(random_resized_crop=True, horizontal_flip=True, color_jitter=0.2)


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_backbone(BackboneSpec(id=str(tiny_clip_dir)))


@pytest.fixture
def photos(tmp_path):
    """Six 40x30 noisy photos in two classes (larger than the tiny CLIP's input, so fitting resizes)."""
    rng = np.random.default_rng(0)
    examples = []
    for i in range(6):
        path = tmp_path / "photos" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path, quality=90)
        examples.append(Example(str(path), i % 2))
    return examples


@pytest.fixture
def own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MMPEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def batches_of(loader, epochs, sampler_batches):
    out = []
    for epoch in epochs:
        for batch in loader.epoch(epoch, sampler_batches):
            out.append(batch["pixel_values"].clone())
    return out


def test_fitted_pixels_preprocess_exactly_as_the_processor(clip, tmp_path):
    """A CLIP-style processor (shortest edge + centre crop) and the tiny one (square resize): fit once, finish per
    batch, bit-identical to the processor on the original photo."""
    from transformers import CLIPImageProcessorPil

    rng = np.random.default_rng(1)
    photos = [Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)) for _ in range(3)]
    for processor in (clip.image_processor, CLIPImageProcessorPil(size={"shortest_edge": 64},
                                                                  crop_size={"height": 64, "width": 64})):
        backbone = load_backbone(BackboneSpec(id=clip.name_or_path))
        backbone.processor.image_processor = processor
        fitted = [backbone.fit_image(photo, room=False) for photo in photos]
        assert fitted[0].dtype == np.uint8 and fitted[0].shape[2] == 3
        expected = backbone.preprocess(photos)
        assert torch.equal(backbone.preprocess_fitted(fitted), expected)
        assert torch.equal(backbone.preprocess_fitted(fitted), expected)  # the lookup table after its check
        backbone._finish_table = False  # as after a failed check: the processor finishes every batch
        assert torch.equal(backbone.preprocess_fitted(fitted), expected)
        base = backbone.fit_image(photos[0], room=True)  # room to crop: larger than the input, aspect kept
        assert min(base.shape[:2]) > min(fitted[0].shape[:2]) and base.shape[1] > base.shape[0]


def test_cache_on_or_off_gives_the_same_run_with_shift_and_augmentation(color_recipe, monkeypatch):
    color_recipe["data"].update(shift=["noise"], augment={"random_resized_crop": True, "horizontal_flip": True})
    color_recipe["train"]["epochs"] = 2
    color_recipe["eval"]["zero_shot"] = False
    image_cache_module.IMAGE_CACHE.clear()
    on = mmpeft.run(color_recipe, ["output.name=cached"])
    stats = image_cache_module.IMAGE_CACHE.stats
    assert stats.memory_hits > 0 and stats.stored_memory > 0
    fitted_with_cache = stats.fitted
    mmpeft.run(color_recipe, ["output.name=seed1", "seed=1", "data.split.seed=0", "train.epochs=1"])
    assert image_cache_module.IMAGE_CACHE.stats.fitted == fitted_with_cache  # another seed, same split: no decoding
    off = mmpeft.run(color_recipe, ["output.name=uncached", "data.image_cache=off", "train.num_workers=0"])
    assert image_cache_module.IMAGE_CACHE.stats.fitted > 2 * fitted_with_cache  # off: every access decodes again
    assert on["test"] == off["test"]
    assert on["train"]["history"] == off["train"]["history"]


def test_zero_and_two_workers_give_bit_identical_augmented_batches(clip, photos):
    dataset = ImageDataset(photos, shifts="noise", augment=AUGMENT, seed=3)
    batches = [[4, 1, 2], [0, 5, 3]]
    with loader_settings("memory"):
        single = EpochLoader(dataset, clip, seed=3, num_workers=0)
        parallel = EpochLoader(dataset, clip, seed=3, num_workers=2)
        first = batches_of(single, (0, 1), batches)
        second = batches_of(parallel, (0, 1), batches)
    assert parallel.loader.num_workers == 2 and parallel.loader.persistent_workers
    parallel.close()
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and len(first) == 4
    assert not torch.equal(first[0], first[2])  # epoch 1 augments differently from epoch 0


def test_auto_workers_none_for_ready_images_some_for_augmentation(clip, photos, monkeypatch):
    monkeypatch.setattr(loader_module, "available_cores", lambda: 3)
    with loader_settings("memory", "auto"):
        ready = make_loader(ImageDataset(photos), clip, batch_size=2)
        augmented = make_loader(ImageDataset(photos, augment=AUGMENT), clip, batch_size=2)
    with loader_settings("off", "auto"):
        uncached = make_loader(ImageDataset(photos), clip, batch_size=2)
    with loader_settings("memory", 1):
        fixed = make_loader(ImageDataset(photos), clip, batch_size=2)
    assert (ready.num_workers, augmented.num_workers, uncached.num_workers, fixed.num_workers) == (0, 2, 2, 1)


def test_a_changed_file_is_detected_and_fitted_again(clip, photos, own_cache_dir):
    for mode in ("memory", "disk"):
        cache = ImageCache()
        dataset = ImageDataset(photos).fitted(clip, mode, cache)
        assert fill_cache(dataset, range(len(photos)), LoaderSettings(mode))
        before = np.array(dataset[0]["pixels"])
        assert cache.stats.memory_hits + cache.stats.disk_hits == 1
        path = photos[0].image
        Image.new("RGB", (40, 30), (250, 0, 0)).save(path, quality=95)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10 ** 9))  # a new version, whatever the clock's grain
        after = dataset[0]["pixels"]
        assert cache.stats.stale == 1
        assert not np.array_equal(before, after) and np.asarray(after)[..., 0].mean() > 200  # the new, red image
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)


def test_disk_cache_is_read_back_by_a_fresh_process_cache(clip, photos, own_cache_dir):
    with loader_settings("disk"):
        first = next(iter(make_loader(ImageDataset(photos), clip, batch_size=6, cache=ImageCache())))
    assert list(own_cache_dir.joinpath("images").rglob("*.npy"))
    fresh = ImageCache()
    with loader_settings("disk"):
        again = next(iter(make_loader(ImageDataset(photos), clip, batch_size=6, cache=fresh)))
    assert fresh.stats.disk_hits >= 6 and fresh.stats.fitted == 0
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    disk_hits = fresh.stats.disk_hits  # read from disk once, then kept in memory (within its limit)
    with loader_settings("disk"):
        third = next(iter(make_loader(ImageDataset(photos), clip, batch_size=6, cache=fresh)))
    assert fresh.stats.disk_hits == disk_hits and fresh.stats.memory_hits >= 6
    assert torch.equal(first["pixel_values"], third["pixel_values"])


def test_a_disk_cache_that_would_not_fit_is_refused_up_front(clip, photos, own_cache_dir, monkeypatch, caplog):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(image_cache_module.shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9, 1000))
    with loader_settings("disk"), pytest.raises(DataError, match=r"6 images need about .* GiB .* only 0.00 GiB"):
        make_loader(ImageDataset(photos), clip, batch_size=2, cache=ImageCache())
    assert not list(own_cache_dir.rglob("*.npy"))  # nothing half-written
    monkeypatch.setenv("MMPEFT_IMAGE_CACHE_MB", "0")  # auto: past the memory limit, and no room on disk either
    with loader_settings("auto"), caplog.at_level(logging.WARNING, logger="mmpeft"):
        loader = make_loader(ImageDataset(photos), clip, batch_size=2, cache=ImageCache())
    assert "decoding images every time" in caplog.text and len(list(loader)) == 3


def test_evaluation_reads_the_cache_and_predicts_the_same(clip, photos):
    from mmpeft.data import LabelSet

    labels = LabelSet(["a", "b"])
    image_cache_module.IMAGE_CACHE.clear()
    with loader_settings("off"):
        uncached = predict(clip, ImageDataset(photos), labels, batch_size=4)
    with loader_settings("memory"):
        predict(clip, ImageDataset(photos), labels, batch_size=4)
        cached = predict(clip, ImageDataset(photos), labels, batch_size=4)
    assert image_cache_module.IMAGE_CACHE.stats.memory_hits >= len(photos)
    assert all(np.array_equal(a, b) for a, b in zip(uncached, cached))


def test_recipe_keys_accept_off_auto_and_worker_counts():
    plain = load_recipe({"method": {"name": "zero_shot"}})
    assert plain.data.image_cache == "auto" and plain.train.num_workers == "auto"
    yaml_off = load_recipe({"method": {"name": "zero_shot"}, "data": {"image_cache": False},
                            "train": {"num_workers": 2}})
    assert yaml_off.data.image_cache == "off" and yaml_off.train.num_workers == 2
    with pytest.raises(RecipeError) as error:
        load_recipe({"method": {"name": "zero_shot"}, "data": {"image_cache": "ram"}, "train": {"num_workers": -1}})
    assert "data.image_cache" in str(error.value) and "train.num_workers" in str(error.value)


def test_generative_processor_outputs_are_reused_per_example():
    from mmpeft.testing import tiny_backbone

    backbone = load_backbone(BackboneSpec(id=str(tiny_backbone("llava"))))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    text = backbone.prompt_text("What is in the image?")
    first = backbone.encode_one(text, [image])
    first["input_ids"][0, 0] = -1  # a caller changing its copy does not change the cache
    second = backbone.encode_one(text, [image.copy()])  # same pixels, another object
    assert (backbone.encoded.misses, backbone.encoded.hits) == (1, 1)
    fresh = dict(backbone.processor(text=[text], images=[image], return_tensors="pt",
                                    add_special_tokens=not text.startswith(backbone.tokenizer.bos_token or "\0")))
    assert fresh.keys() == second.keys() and all(torch.equal(fresh[k], second[k]) for k in fresh)
    other = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    backbone.encode_one(text, [other])
    assert backbone.encoded.misses == 2


def test_a_second_generative_epoch_skips_the_processor(photos):
    """The real path: cached decoded images -> loader -> answer-loss inputs; epoch 2 hits for every example."""
    from mmpeft.data import LabelSet
    from mmpeft.objectives import make_objective
    from mmpeft.testing import tiny_backbone

    backbone = load_backbone(BackboneSpec(id=str(tiny_backbone("llava"))))
    objective = make_objective("generative", backbone, LabelSet(["cat", "dog"]))
    loader = EpochLoader(ImageDataset(photos), backbone, seed=0, num_workers=0)
    epochs = [[objective.inputs(batch) for batch in loader.epoch(epoch, [[0, 1, 2], [3, 4, 5]])] for epoch in (0, 1)]
    assert (backbone.encoded.misses, backbone.encoded.hits) == (len(photos), len(photos))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*epochs) for k in a)
