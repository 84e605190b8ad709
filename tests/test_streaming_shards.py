"""Streamed WebDataset shards (`data.stream: true`): seeded order, shuffle buffer, resume at a shard + sample
position without decoding the skipped samples, contrastive training, recipe errors, bad samples, `pipe:` URLs."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
from test_captions import SHADES, caption_recipe, captioned_images, shards, write_shards  # noqa: F401

import mmpeft
from mmpeft.core.schema import RecipeError
from mmpeft.data import DataError, load_data
from mmpeft.data.stream_dataset import StreamDataset, StreamLoader
from mmpeft.objectives.contrastive import Contrastive
from mmpeft.runs.recipe import load_recipe
from mmpeft.train import Callback, Trainer


@pytest.fixture(scope="module")
def stream_shards(request) -> tuple[str, str]:
    """test_captions' shards (24 training samples in 4 shards, 12 held out with json members), streamed here."""
    return request.getfixturevalue("shards")


def stream_data(train: str, held_out: str, **data) -> dict:
    return {"source": "webdataset", "path": train, "eval_path": held_out, "stream": True, "split": {"val": 0.0},
            **data}


def train_stream(train: str, held_out: str, seed: int = 0, **data) -> StreamDataset:
    recipe = load_recipe({"method": "zero_shot", "seed": seed, "train": {"objective": "contrastive"},
                          "data": stream_data(train, held_out, **data)})
    return load_data(recipe.data, seed).dataset("train", augment=True, seed=seed, spec=recipe.data)


def test_the_order_is_a_function_of_seed_and_epoch(stream_shards):
    train, held_out = stream_shards
    stream = train_stream(train, held_out, shuffle_buffer=8)
    assert len(stream) == 24  # counted by the header scan
    first = stream.keys()
    assert first == stream.keys() and sorted(first) == sorted(train_stream(train, held_out, shuffle_buffer=8).keys())
    assert len(set(first)) == 24
    stream.set_epoch(1)
    assert stream.keys() != first and sorted(stream.keys()) == sorted(first)
    assert train_stream(train, held_out, seed=1, shuffle_buffer=8).keys() != first


def test_a_longer_epoch_takes_another_pass_and_a_shorter_one_stops(stream_shards):
    train, held_out = stream_shards
    keys = train_stream(train, held_out, shuffle_buffer=8, samples_per_epoch=30).keys()
    assert len(keys) == 30 and len(set(keys[:24])) == 24 and set(keys[24:]) <= set(keys[:24])
    assert keys[:24] == train_stream(train, held_out, shuffle_buffer=8).keys()  # the first pass is the counted epoch
    assert train_stream(train, held_out, shuffle_buffer=8, samples_per_epoch=10).keys() == keys[:10]


def test_a_buffer_of_zero_keeps_the_shard_order(stream_shards):
    train, held_out = stream_shards
    keys = train_stream(train, held_out, shuffle_buffer=0).keys()
    for start in range(0, 24, 6):  # each shard whole, its samples in the order written
        block = keys[start:start + 6]
        assert len({key.split(":")[0] for key in block}) == 1 and block == sorted(block)
    orders = {tuple(train_stream(train, held_out, seed=seed, shuffle_buffer=0).keys()[::6]) for seed in range(4)}
    assert len(orders) > 1  # the shard order depends on the seed


def test_augmentation_of_a_stream_depends_on_seed_epoch_and_position_only(stream_shards):
    import numpy as np

    train, held_out = stream_shards
    stream = train_stream(train, held_out, shuffle_buffer=8, augment={"horizontal_flip": True, "color_jitter": 0.3})
    assert stream.augment is not None
    stream.plan([4], 2)
    first = [np.asarray(item["image"]) for item in next(iter(stream))]
    again = [np.asarray(item["image"]) for item in next(iter(stream))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    plain = train_stream(train, held_out, shuffle_buffer=8)
    plain.plan([4], 2)
    assert not all(np.array_equal(a, np.asarray(item["image"])) for a, item in zip(first, next(iter(plain))))


def test_one_reading_worker_gives_the_same_batches(stream_shards, tiny_clip_dir):
    from mmpeft.data.stream_dataset import stream_loader
    from mmpeft.runs.build import load_base

    train, held_out = stream_shards
    stream = train_stream(train, held_out, shuffle_buffer=8)
    backbone = load_base(load_recipe({"method": "zero_shot", "backbone": {"id": str(tiny_clip_dir)}}))
    from mmpeft.data.dataset import ImageCollator

    batches = [[0] * 5] * 4 + [[0] * 4]
    seen = {workers: [key for batch in stream_loader(stream, ImageCollator(backbone.preprocess), 0, batches, workers)
                      for key in batch["image_keys"]] for workers in (0, 1)}
    assert seen[0] == seen[1] == stream.keys()


class Record(Callback):
    """Keeps every trained batch's keys; raises KeyboardInterrupt on batch `stop_at` (counted from 1)."""

    def __init__(self, seen: list[list[str]], stop_at: int | None = None):
        self.seen, self.stop_at = seen, stop_at

    def transform_batch(self, batch: dict) -> dict:
        if self.stop_at is not None and len(self.seen) + 1 == self.stop_at:
            raise KeyboardInterrupt
        self.seen.append(list(batch["image_keys"]))
        return batch


def test_an_interrupted_epoch_resumes_with_exactly_its_remaining_samples(stream_shards, tiny_clip_dir, tmp_path,
                                                                         monkeypatch, caplog):
    train, held_out = stream_shards
    recipe = caption_recipe(stream_data(train, held_out, shuffle_buffer=8), tiny_clip_dir, tmp_path, epochs=2,
                            batch_size=4, checkpoint_every_steps=1, num_workers=0)
    recipe["eval"]["zero_shot"] = False
    before: list[list[str]] = []
    original_init = Trainer.__init__

    def init_with(callback):
        def init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            self.callbacks = (callback,)
        return init

    monkeypatch.setattr(Trainer, "__init__", init_with(Record(before, stop_at=4)))  # 3 of 6 batches trained
    with pytest.raises(KeyboardInterrupt):
        mmpeft.run(recipe)
    run_dir = tmp_path / "run"
    progress = json.loads((run_dir / "checkpoints" / "last" / "progress.json").read_text())
    epoch = train_stream(train, held_out, shuffle_buffer=8).keys()  # one uninterrupted epoch 0
    shard, key = epoch[11].split(":")
    position = progress["stream_position"]
    assert progress["batch_in_epoch"] == 3 and position["samples"] == 12 and position["epoch"] == 0
    assert position["shard"] == shard and position["key"] == f"{shard}:{key}"
    assert position["offset_in_shard"] == int(key.removeprefix("sample")) % 6  # ShardWriter: 6 a shard, in order

    decoded = []
    original_item = StreamDataset.item
    monkeypatch.setattr(StreamDataset, "item", lambda self, *a: decoded.append(a[0]) or original_item(self, *a))
    after: list[list[str]] = []
    monkeypatch.setattr(Trainer, "__init__", init_with(Record(after)))
    checked = []
    original_check = StreamLoader.check_resumed
    monkeypatch.setattr(StreamLoader, "check_resumed",
                        lambda self, key: checked.append(key) or original_check(self, key))
    with caplog.at_level(logging.WARNING, logger="mmpeft"):
        metrics = mmpeft.run(None, resume=run_dir)
    assert checked == [epoch[11]] and "the shards changed" not in caplog.text  # it skipped to the recorded sample
    rest = [k for batch in after[:3] for k in batch]
    trained = [k for batch in before for k in batch]
    assert trained + rest == epoch and len(set(trained + rest)) == 24  # no repeats, nothing missing
    assert decoded[:12] == list(range(12, 24))  # the skipped 12 were never decoded
    assert metrics["train"]["steps"] == 12 and metrics["train"]["stream_position"]["samples"] == 24


def test_a_resume_whose_recorded_sample_differs_says_the_shards_changed(stream_shards, caplog):
    import torch

    from mmpeft.data.dataset import ImageCollator
    from mmpeft.data.stream_dataset import stream_loader

    train, held_out = stream_shards
    stream = train_stream(train, held_out, shuffle_buffer=8)
    keys = stream.keys()
    collate = ImageCollator(lambda images: torch.zeros(len(images)))
    for recorded, warned in ((keys[7], False), ("train-0009.tar:sample00099", True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mmpeft"):
            loader = stream_loader(stream, collate, 0, [[0] * 8] * 2, 0, {"epoch": 0, "samples": 8, "key": recorded})
            assert [k for batch in loader for k in batch["image_keys"]] == keys[8:]
        assert ("the shards changed since the checkpoint" in caplog.text) is warned


def test_a_streamed_run_trains_contrastively_and_tests_on_the_held_out_shards(stream_shards, tiny_clip_dir,
                                                                               tmp_path, monkeypatch):
    train, held_out = stream_shards
    losses = []
    original = Contrastive.loss
    monkeypatch.setattr(Contrastive, "loss", lambda self, batch: losses.append(original(self, batch)) or losses[-1])
    metrics = mmpeft.run(caption_recipe(stream_data(train, held_out, val_path=held_out, split={"val": 0.2},
                                                    shuffle_buffer=8, samples_per_epoch=16),
                                        tiny_clip_dir, tmp_path, epochs=3, num_workers=0))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["data"]["counts"] == {"train": 16, "val": 12, "test": 12} and saved["data"]["stream"] is True
    assert saved["train"]["steps"] == 6 and saved["retrieval"]["test"]["image_to_text"]["queries"] == 12
    first, last = (sum(float(x.detach()) for x in part) / 2 for part in (losses[:2], losses[-2:]))
    assert last < first
    assert metrics["train"]["stream_position"]["samples"] == 16
    history = metrics["train"]["history"]  # caption-only val: the best epoch is the best val image->text R@1
    assert all(0 <= e["val_retrieval"] <= 1 and "val_retrieval_text_to_image" in e for e in history)
    assert metrics["train"]["best_epoch"] == max(history, key=lambda e: e["val_retrieval"])["epoch"]


def test_stream_recipe_errors_name_the_key(stream_shards, tmp_path):
    train, held_out = stream_shards
    base = {"method": "lora", "train": {"objective": "contrastive"}, "data": stream_data(train, held_out)}
    cases = {
        "data.shots: a stream cannot be sampled k per class": {"data": {"shots": 2}},
        "data.split.val: 0.15 cannot be a random share of a stream; set data.val_path": {"data": {"split": {}}},
        "data.eval_path: a streamed training split needs held-out shards": {"data": {"eval_path": None}},
        "data.shuffle_buffer: -1": {"data": {"shuffle_buffer": -1}},
        "data.samples_per_epoch: 0": {"data": {"samples_per_epoch": 0}},
        "data.source is 'captions'": {"data": {"source": "captions"}},
        "train.objective: a streamed split trains with 'classification'": {"train": {"objective": "generative"}},
        "train.num_workers: 2 with data.stream": {"train": {"objective": "contrastive", "num_workers": 2}},
    }
    for message, change in cases.items():
        recipe = {**base, **{k: {**base[k], **v} for k, v in change.items()}}
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe(recipe)
    with pytest.raises(RecipeError, match="data.val_path applies to a streamed training split"):
        load_recipe({**base, "data": {**base["data"], "stream": False, "val_path": held_out}})
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patched:
        patched.setenv("LOCAL_WORLD_SIZE", "2")
        with pytest.raises(RecipeError, match="data.stream: 2 processes"):
            load_recipe(base)


def test_bad_samples_are_skipped_with_a_warning_and_an_all_bad_stream_fails(tmp_path, caplog):
    pytest.importorskip("webdataset")
    import webdataset as wds

    images = captioned_images(tmp_path / "img", 3)
    png = [(tmp_path / "img" / name).read_bytes() for name, _, _ in images]
    with wds.TarWriter(str(tmp_path / "mixed-0000.tar")) as sink:
        sink.write({"__key__": "ok", "png": png[0], "txt": "a red image"})
        sink.write({"__key__": "uncaptioned", "png": png[1]})
        sink.write({"__key__": "textonly", "txt": "a blue image"})
        sink.write({"__key__": "ok2", "png": png[2], "txt": "a green image"})
    with wds.TarWriter(str(tmp_path / "bad-0000.tar")) as sink:
        sink.write({"__key__": "textonly", "txt": "a blue image"})
    with wds.TarWriter(str(tmp_path / "held-0000.tar")) as sink:  # held out: not a training shard
        sink.write({"__key__": "ok", "png": png[0], "txt": "a red image"})
    held_out = str(tmp_path / "held-0000.tar")
    with caplog.at_level(logging.WARNING, logger="mmpeft"):
        stream = train_stream(str(tmp_path / "mixed-0000.tar"), held_out, on_bad_rows="skip", shuffle_buffer=0)
        assert len(stream) == 2 and stream.keys() == ["mixed-0000.tar:ok", "mixed-0000.tar:ok2"]
        assert stream.source.bad == 2
    assert "2 of 4 samples of" in caplog.text
    assert "mixed-0000.tar:uncaptioned (no caption" in caplog.text
    assert "mixed-0000.tar:textonly (no image" in caplog.text
    with pytest.raises(DataError, match="no usable sample"):
        train_stream(str(tmp_path / "bad-0000.tar"), held_out, on_bad_rows="skip")
    with wds.TarWriter(str(tmp_path / "list-0000.tar")) as sink:  # several captions in a json: not one caption
        sink.write({"__key__": "many", "png": png[1], "json": json.dumps({"caption": ["a", "b"]})})
        sink.write({"__key__": "one", "png": png[2], "json": json.dumps({"caption": "a green image"})})
    listed = train_stream(str(tmp_path / "list-0000.tar"), held_out, on_bad_rows="skip", shuffle_buffer=0)
    assert listed.keys() == ["list-0000.tar:one"] and listed.source.bad == 1
    stream = train_stream(str(tmp_path / "bad-0000.tar"), held_out, on_bad_rows="skip", samples_per_epoch=4)
    with pytest.raises(DataError, match="a whole epoch of the 1 shards .* yielded no usable sample"):
        stream.keys()



def test_a_streamed_image_over_the_pixel_cap_is_refused_before_it_decodes(tmp_path):
    """data.max_image_pixels held for files and indexed shards only: a streamed 12000x12000 PNG (a few hundred
    bytes of header) decoded to half a gigabyte and trained."""
    pytest.importorskip("webdataset")
    import io

    import webdataset as wds
    from PIL import Image

    images = captioned_images(tmp_path / "img", 1)
    small = (tmp_path / "img" / images[0][0]).read_bytes()  # 12x12
    big = io.BytesIO()
    Image.new("RGB", (24, 24), (40, 50, 220)).save(big, "PNG")
    with wds.TarWriter(str(tmp_path / "big-0000.tar")) as sink:
        sink.write({"__key__": "ok", "png": small, "txt": "a red image"})
        sink.write({"__key__": "big", "png": big.getvalue(), "txt": "a blue image"})
    with wds.TarWriter(str(tmp_path / "held-0000.tar")) as sink:
        sink.write({"__key__": "ok", "png": small, "txt": "a red image"})
    stream = train_stream(str(tmp_path / "big-0000.tar"), str(tmp_path / "held-0000.tar"), shuffle_buffer=0,
                          max_image_pixels=12 * 12)  # the held-out 12x12 image fits, the streamed 24x24 does not
    stream.plan([1, 1], 0)
    batches = iter(stream)
    assert [item["key"] for item in next(batches)] == ["big-0000.tar:ok"]
    with pytest.raises(DataError, match=re.escape("the image of stream sample big-0000.tar:big is too large "
                                                  "(24x24 = 576 pixels, over data.max_image_pixels = 144)")):
        next(batches)
    recipe = load_recipe({"method": "zero_shot", "train": {"objective": "contrastive"},  # held out behind a URL
                          "data": stream_data(str(tmp_path / "held-0000.tar"), f"pipe:cat {tmp_path / 'big-0000.tar'}",
                                              max_image_pixels=12 * 12)})
    with pytest.raises(DataError, match=re.escape("big-0000.tar:big: image is too large (24x24 = 576 pixels, over "
                                                  "data.max_image_pixels = 144)")):
        load_data(recipe.data, 0)


def test_pipe_urls_stream_through_webdataset(stream_shards):
    train, held_out = stream_shards
    piped = train_stream(f"pipe:cat {train}", f"pipe:cat {held_out}", shuffle_buffer=8)
    assert len(piped) == 24 and piped.keys() == train_stream(train, held_out, shuffle_buffer=8).keys()
    item = next(iter(piped))[0]
    assert item["image"].size == (12, 12) and item["text"].startswith("a ")
    data = load_data(load_recipe({"method": "zero_shot", "train": {"objective": "contrastive"},
                                  "data": stream_data(f"pipe:cat {train}", f"pipe:cat {held_out}")}).data, 0)
    assert len(data.test) == 12 and data.test[0].text.startswith("a ")  # materialised from the pipe, in order


def test_missing_shards_are_clear_errors(tmp_path, stream_shards):
    with pytest.raises(DataError, match="2 of 2 shards do not exist"):
        train_stream(str(tmp_path / "none-{0000..0001}.tar"), str(tmp_path / "none-0000.tar"))
    # the failing pipe shows as its exit status (OSError) or, when tar reads first, as an empty file (ReadError)
    with pytest.raises(DataError, match=r"cannot read 'pipe:cat .*none-0000.tar' through webdataset: (OSError|Read)"):
        train_stream(f"pipe:cat {tmp_path / 'none-0000.tar'}", stream_shards[1])
    with pytest.raises(DataError, match=r"1 of 1 shards do not exist .*; its braces did not expand"):
        train_stream(str(tmp_path / "none-{0000..}.tar"), stream_shards[1])


def test_held_out_shards_that_are_training_shards_are_refused(stream_shards, caplog):
    train, held_out = stream_shards  # a shard both trained on and scored would not be held out
    cases = [("data.val_path", {"val_path": train.replace("{0000..0003}", "0002")}, "data.path"),
             ("data.eval_path", {"eval_path": train}, "data.path")]
    for key, data, other in cases:
        split = {"val": 0.1 if "val_path" in data else 0.0}
        recipe = load_recipe({"method": "zero_shot", "train": {"objective": "contrastive"},
                              "data": {**stream_data(train, held_out, split=split), **data}})
        with pytest.raises(DataError, match=rf"^{key}: .* and {other} .* share \d file\(s\) .*give {key} files"):
            load_data(recipe.data, 0)
    recipe = load_recipe({"method": "zero_shot", "train": {"objective": "contrastive"},
                          "data": stream_data(train, held_out, val_path=held_out, split={"val": 0.1})})
    with caplog.at_level(logging.WARNING, logger="mmpeft"):
        load_data(recipe.data, 0)  # validation on the test shards: allowed, but the best epoch is picked on them
    assert "data.val_path: " in caplog.text and "the best epoch would be picked on test data" in caplog.text


# --- labelled streams (classification) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory) -> tuple[str, str, str]:
    """(train: .cls, eval: json labels in 'colour', val: .cls) of the red/green/blue images."""
    pytest.importorskip("webdataset", reason="WebDataset shards need the webdataset package (mmpeft[webdataset])")
    root = tmp_path_factory.mktemp("labelled")
    images = root / "img"
    train = write_shards(root, "train", captioned_images(images, 24, seed=0), images, per_shard=6, member="cls")
    held_out = write_shards(root, "eval", captioned_images(images, 12, seed=1), images, 12, json_meta=True)
    val = write_shards(root, "val", captioned_images(images, 6, seed=2), images, per_shard=6, member="cls")
    return train, held_out, val


def labelled_data(train: str, held_out: str, **data) -> dict:
    return stream_data(train, held_out, label_column="colour", **data)


def labelled_stream(train: str, held_out: str, **data):
    recipe = load_recipe({"method": "zero_shot", "data": labelled_data(train, held_out, **data)})
    loaded = load_data(recipe.data, 0)
    return loaded, loaded.dataset("train", seed=0, spec=recipe.data)


def test_a_labelled_stream_trains_with_classification_and_selects_the_best_epoch(labelled_shards, tiny_clip_dir,
                                                                                 tmp_path):
    train, held_out, val = labelled_shards
    recipe = caption_recipe(labelled_data(train, held_out, val_path=val, shuffle_buffer=8,
                                          templates=["a photo of a {label} image."]),
                            tiny_clip_dir, tmp_path, objective="classification", epochs=3, num_workers=0)
    metrics = mmpeft.run(recipe)
    data = metrics["data"]
    assert data["labelled"] is True and data["classes"] == 3 and data["labels_from"] == "the counting pass"
    assert data["counts"] == {"train": 24, "val": 6, "test": 12}
    assert metrics["zero_shot"]["n"] == 12 and metrics["test"]["n"] == 12 and "accuracy" in metrics["test"]
    history = metrics["train"]["history"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3] and all("val_accuracy" in e for e in history)
    best = max(history, key=lambda e: e["val_accuracy"])  # the first of the best, as the trainer keeps it
    assert metrics["train"]["best_epoch"] == best["epoch"]
    assert metrics["train"]["steps"] == 9 and metrics["train"]["stream_position"]["samples"] == 24


def test_labels_from_data_classes_the_counting_pass_and_the_held_out_shards_agree(labelled_shards):
    train, held_out, _ = labelled_shards
    counted, stream = labelled_stream(train, held_out, shuffle_buffer=8)
    assert counted.labels.keys == ["blue", "green", "red"]  # naturally sorted, as the indexed reader sorts them
    listed, listed_stream = labelled_stream(train, held_out, shuffle_buffer=8, classes=["blue", "green", "red"])
    held, _ = labelled_stream(train, held_out, shuffle_buffer=8, samples_per_epoch=24)
    assert listed.labels.keys == held.labels.keys == counted.labels.keys
    assert listed.info["labels_from"] == "data.classes" and held.info["labels_from"].startswith("the held-out shards")
    stream.plan([24], 0)
    items = next(iter(stream))
    listed_stream.plan([24], 0)
    assert [(i["key"], i["label"]) for i in items] == [(i["key"], i["label"]) for i in next(iter(listed_stream))]
    names = counted.labels.keys
    colours = {f"train-{i // 6:04d}.tar:sample{i:05d}": list(SHADES)[i % 3] for i in range(24)}
    assert all(names[item["label"]] == colours[item["key"]] for item in items)
    assert [e.label for e in counted.test] == [names.index(c) for c in ("red", "green", "blue") * 4]
    reordered, _ = labelled_stream(train, held_out, classes=["red", "green", "blue"])
    assert reordered.labels.keys == ["red", "green", "blue"]  # data.classes fixes the order as written


def test_a_training_label_outside_the_label_set_is_a_named_error(labelled_shards, tmp_path):
    import webdataset as wds

    train, held_out, _ = labelled_shards
    with wds.TarWriter(str(tmp_path / "two-0000.tar")) as sink:  # held-out shards without the class 'blue'
        for i, (name, _, colour) in enumerate(captioned_images(tmp_path / "img", 6, seed=3)):
            if colour != "blue":
                sink.write({"__key__": f"s{i}", "png": (tmp_path / "img" / name).read_bytes(), "cls": colour})
    data, stream = labelled_stream(train, str(tmp_path / "two-0000.tar"), samples_per_epoch=24)
    assert data.labels.keys == ["green", "red"] and data.info["labels_from"].startswith("the held-out shards")
    with pytest.raises(DataError, match=r"has the label 'blue', which is not in the label set from the held-out "
                                        r"shards \(data.eval_path/val_path\) \(2 classes: green, red\); list every"):
        stream.keys()
    with pytest.raises(DataError, match=r"stream sample train-000\d.tar:sample\d+ has the label 'red', which is not "
                                        r"in data.classes .*list every class of the training shards in data.classes"):
        labelled_stream(train, held_out, classes=["blue", "green"])
    _, stream = labelled_stream(train, held_out, classes=["blue", "green"], samples_per_epoch=24, on_bad_rows="skip")
    with pytest.raises(DataError, match=r"stream sample train-000\d.tar:sample\d+ has the label 'red', which is not "
                                        r"in the label set from data.classes \(2 classes: blue, green\)"):
        stream.keys()


def test_classification_on_unlabelled_shards_is_a_named_error(stream_shards, labelled_shards, tiny_clip_dir, tmp_path):
    train, held_out = stream_shards
    recipe = caption_recipe(stream_data(train, held_out), tiny_clip_dir, tmp_path, objective="classification")
    with pytest.raises(DataError, match="streams caption data: the counting pass found no sample with a label"):
        mmpeft.run(recipe)
    recipe["data"]["samples_per_epoch"] = 24
    with pytest.raises(DataError, match="the held-out shards .* carry no label, and data.samples_per_epoch skipped"):
        mmpeft.run(recipe)
    _, labelled_eval, _ = labelled_shards  # labelled held-out shards, caption-only training shards: the first epoch
    _, stream = labelled_stream(train, labelled_eval, samples_per_epoch=24)
    with pytest.raises(DataError, match=r"is read as labelled .* a whole epoch of its 4 shards \(24 samples\) "
                                        r"yielded no sample with an image and a label"):
        stream.keys()
    with pytest.raises(DataError, match="data.classes: the shards of .* carry no labels"):
        train_stream(train, held_out, classes=["a", "b"])
    with pytest.raises(DataError, match="lack labels .* but the training shards .* do: give both labels, or neither"):
        labelled_stream(labelled_shards[0], train)  # held-out shards of captions only (.txt)


def test_a_labelled_sample_without_a_label_is_skipped_counted_and_named(tmp_path, caplog):
    pytest.importorskip("webdataset")
    import webdataset as wds

    images = captioned_images(tmp_path / "img", 4)
    png = [(tmp_path / "img" / name).read_bytes() for name, _, _ in images]
    with wds.TarWriter(str(tmp_path / "mixed-0000.tar")) as sink:
        for key, image, extra in (("red", 0, {"cls": "red"}), ("unlabelled", 1, {"txt": "a green image"}),
                                  ("blue", 2, {"cls": "blue"}), ("green", 3, {"cls": "green"})):
            sink.write({"__key__": key, "png": png[image], **extra})
    shard = str(tmp_path / "mixed-0000.tar")
    held_out = shutil.copy(shard, tmp_path / "held-0000.tar")  # the same samples, held out in a shard of their own
    with caplog.at_level(logging.WARNING, logger="mmpeft"):
        data, stream = labelled_stream(shard, str(held_out), on_bad_rows="skip", shuffle_buffer=0)
        assert stream.keys() == ["mixed-0000.tar:red", "mixed-0000.tar:blue", "mixed-0000.tar:green"]
    assert len(stream) == 3 and stream.source.bad == 1 and data.info["stream_bad_samples"] == 1
    assert "1 of 4 samples of" in caplog.text and "no image member or no label" in caplog.text
    assert "skipped bad sample mixed-0000.tar:unlabelled (no label (a .cls member" in caplog.text
    assert data.labels.keys == ["blue", "green", "red"] and len(data.test) == 3  # the held-out row skipped too


def test_labelled_pipe_urls_read_the_same_labels(labelled_shards):
    train, held_out, _ = labelled_shards
    local, stream = labelled_stream(train, held_out, shuffle_buffer=8)
    piped, piped_stream = labelled_stream(f"pipe:cat {train}", f"pipe:cat {held_out}", shuffle_buffer=8)
    assert piped.labels.keys == local.labels.keys and [e.label for e in piped.test] == [e.label for e in local.test]
    for one in (stream, piped_stream):
        one.plan([24], 0)
    assert [(i["key"], i["label"]) for i in next(iter(piped_stream))] == [(i["key"], i["label"])
                                                                         for i in next(iter(stream))]


def test_a_resumed_labelled_stream_ends_as_an_uninterrupted_run(labelled_shards, tiny_clip_dir, tmp_path, monkeypatch):
    train, held_out, val = labelled_shards
    recipe = caption_recipe(labelled_data(train, held_out, val_path=val, shuffle_buffer=8), tiny_clip_dir, tmp_path,
                            objective="classification", epochs=2, batch_size=4, checkpoint_every_steps=1,
                            num_workers=0)
    recipe["eval"]["zero_shot"] = False
    whole = mmpeft.run({**recipe, "output": {"dir": str(tmp_path), "name": "whole"}})
    original_init = Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.callbacks = (Record([], stop_at=9),)  # batch 3 of epoch 2 (6 batches an epoch)

    monkeypatch.setattr(Trainer, "__init__", init)
    with pytest.raises(KeyboardInterrupt):
        mmpeft.run(recipe)
    monkeypatch.setattr(Trainer, "__init__", original_init)
    progress = json.loads((tmp_path / "run" / "checkpoints" / "last" / "progress.json").read_text())
    assert progress["stream_position"]["epoch"] == 1 and progress["stream_position"]["samples"] == 8
    resumed = mmpeft.run(None, resume=tmp_path / "run")
    assert resumed["train"]["history"] == whole["train"]["history"]
    assert resumed["train"]["best_epoch"] == whole["train"]["best_epoch"]
    assert resumed["test"]["accuracy"] == whole["test"]["accuracy"]
    assert resumed["test"]["confusion_matrix"] == whole["test"]["confusion_matrix"]
