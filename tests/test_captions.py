"""Caption-only data for contrastive training: open_clip's caption tables (TSV/CSV, `filepath` + `title`) and
WebDataset shards, each written here in the tool's documented layout and trained on for a few steps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmpeft
from mmpeft.data import DataError, load_data
from mmpeft.data.sources import ShardImage
from mmpeft.runs.recipe import load_recipe

SHADES = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}
CAPTIONS = {"dark": 0.45, "bright": 1.0}


def captioned_images(root: Path, count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(file name, caption, colour) of `count` noisy images: 'a dark red image', 'a bright blue image', ..."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour = list(SHADES)[i % 3]
        shade = list(CAPTIONS)[(i // 3) % 2]
        pixels = np.array(SHADES[colour]) * CAPTIONS[shade] + rng.normal(0, 20, (12, 12, 3))
        name = f"{seed}-{i:03d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name)
        rows.append((name, f"a {shade} {colour} image", colour))
    return rows


def write_table(path: Path, rows, separator: str = "\t", labels: bool = False) -> Path:
    """open_clip's CSV/TSV layout: a `filepath` and a `title` column (here with an optional `label`)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=separator)
        writer.writerow(["filepath", "title"] + (["label"] if labels else []))
        for name, caption, colour in rows:
            writer.writerow([name, caption] + ([colour] if labels else []))
    return path


@pytest.fixture(scope="module")
def caption_tables(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("captions")
    train = write_table(root / "train.tsv", captioned_images(root, 24, seed=0))
    held_out = write_table(root / "eval.tsv", captioned_images(root, 12, seed=1))
    return train, held_out


def caption_recipe(data: dict, clip_dir: Path, out: Path, **train) -> dict:
    return {"name": "captions", "seed": 0, "backbone": {"id": str(clip_dir)}, "data": data,
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "train": {"objective": "contrastive", "epochs": 3, "batch_size": 8, "lr": 0.02, "warmup_ratio": 0.0,
                      **train},
            "eval": {"batch_size": 32}, "output": {"dir": str(out), "name": "run"}}


def test_open_clip_table_reads_without_a_label_column(caption_tables):
    train, held_out = caption_tables
    data = load_data(load_recipe({"method": "zero_shot", "data": {
        "source": "captions", "path": str(train), "eval_path": str(held_out), "split": {"val": 0.25}}}).data, 0)
    assert data.info["labelled"] is False and len(data.labels) == 0
    assert data.info["counts"] == {"train": 18, "val": 6, "test": 12}  # test: exactly the held-out table
    assert all(e.label == -1 and e.text.startswith("a ") for e in data.train + data.val + data.test)
    assert {Path(e.image).name.split("-")[0] for e in data.test} == {"1"}


def test_caption_table_trains_contrastively_and_reports_retrieval_only(caption_tables, tiny_clip_dir, tmp_path):
    train, held_out = caption_tables
    metrics = mmpeft.run(caption_recipe({"source": "captions", "path": str(train), "eval_path": str(held_out),
                                         "split": {"val": 0.0}}, tiny_clip_dir, tmp_path))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for stage in ("zero_shot", "test"):  # classification skipped, and saying so
        assert "accuracy" not in saved[stage] and "caption-only data has no labels" in saved[stage]["skipped"]
    retrieval = saved["retrieval"]
    assert retrieval["test"]["image_to_text"]["queries"] == 12 and retrieval["test"]["text_to_image"]["queries"] == 6
    assert retrieval["test"]["image_to_text"]["R@1"] > retrieval["zero_shot"]["image_to_text"]["R@1"]
    assert metrics["train"]["steps"] == 9  # 24 rows, batch 8, 3 epochs
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Classification metrics not computed" in report and "## Retrieval" in report


def test_a_caption_table_with_a_val_share_selects_the_best_epoch_by_val_retrieval(caption_tables, tiny_clip_dir,
                                                                                   tmp_path):
    train, held_out = caption_tables
    metrics = mmpeft.run(caption_recipe({"source": "captions", "path": str(train), "eval_path": str(held_out),
                                         "split": {"val": 0.25}}, tiny_clip_dir, tmp_path, epochs=2))
    history = metrics["train"]["history"]
    assert len(history) == 2 and all("val_retrieval" in e and "val_accuracy" not in e for e in history)
    assert metrics["train"]["best_epoch"] == max(history, key=lambda e: e["val_retrieval"])["epoch"]


def test_a_label_column_stays_optional_and_gives_classification_metrics(tmp_path, tiny_clip_dir):
    rows = captioned_images(tmp_path / "images", 24)
    table = write_table(tmp_path / "images" / "labelled.csv", rows, separator=",", labels=True)
    metrics = mmpeft.run(caption_recipe({"source": "captions", "path": str(table), "separator": ",",
                                         "split": {"val": 0.0, "test": 0.25}}, tiny_clip_dir, tmp_path, epochs=1))
    assert metrics["data"]["labelled"] is True and metrics["test"]["n"] == 6 and "accuracy" in metrics["test"]
    assert "retrieval" in metrics


def test_caption_table_errors_name_the_fix(tmp_path, tiny_clip_dir):
    rows = captioned_images(tmp_path, 6)
    comma = write_table(tmp_path / "comma.csv", rows, separator=",")
    with pytest.raises(DataError, match="data.separator: ','"):
        load_data(load_recipe({"method": "zero_shot", "data": {"source": "captions", "path": str(comma)}}).data, 0)
    renamed = tmp_path / "renamed.tsv"
    renamed.write_text(comma.read_text().replace(",", "\t").replace("title", "caption"))
    with pytest.raises(DataError, match=r"data.text_column: no column 'text'.*open_clip tables name it 'title'"):
        load_data(load_recipe({"method": "zero_shot", "data": {"source": "captions", "path": str(renamed)}}).data, 0)
    spec = load_recipe({"method": "zero_shot", "data": {"source": "captions", "path": str(renamed),
                                                        "text_column": "caption"}}).data
    assert load_data(spec, 0).info["labelled"] is False
    empty = tmp_path / "empty.tsv"
    empty.write_text("filepath\ttitle\n" + f"{rows[0][0]}\t\n" + "".join(f"{n}\t{c}\n" for n, c, _ in rows[1:]))
    with pytest.raises(DataError, match="line 2: .*empty caption column 'title'"):
        load_data(load_recipe({"method": "zero_shot", "data": {"source": "captions", "path": str(empty)}}).data, 0)
    classify = caption_recipe({"source": "captions", "path": str(renamed), "text_column": "caption"},
                              tiny_clip_dir, tmp_path, objective="classification")
    with pytest.raises(DataError, match="caption-only.*train.objective: contrastive"):
        mmpeft.run(classify)
    import yaml

    from mmpeft.validation import check_recipe

    (tmp_path / "classify.yaml").write_text(yaml.safe_dump(classify))
    with pytest.raises(DataError, match="caption-only.*train.objective: contrastive"):  # `mmpeft check` said fine
        check_recipe(tmp_path / "classify.yaml")


def test_a_wrong_separator_a_foreign_encoding_and_a_held_out_training_table_are_named(tmp_path):
    rows = captioned_images(tmp_path, 6)
    semicolons = tmp_path / "semi.csv"
    semicolons.write_text(write_table(tmp_path / "t.csv", rows, separator=",").read_text().replace(",", ";"))
    with pytest.raises(DataError) as caught:
        load_data(load_recipe({"method": "zero_shot", "data": {"source": "captions", "path": str(semicolons),
                                                                "separator": ","}}).data, 0)
    assert str(caught.value) == (f"data.separator: {semicolons} has a single column 'filepath;title' with "
                                 "data.separator ','; set data.separator to the character between its columns")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes(write_table(tmp_path / "u.tsv", rows).read_bytes() + f"{rows[0][0]}\tcafé\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.tsv: line 8 is not UTF-8 text \(byte 0xe9 at column 14"):
        load_data(load_recipe({"method": "zero_shot", "data": {"source": "captions", "path": str(latin)}}).data, 0)
    twice = tmp_path / "twice.tsv"  # a second `title` column would silently caption every row from the last one
    twice.write_text("filepath\ttitle\ttitle\n" + "".join(f"{name}\t{caption}\tx\n" for name, caption, _ in rows))
    with pytest.raises(DataError, match=r"twice.tsv: the header names column 'title' 2 times \(columns: filepath, "):
        load_data(load_recipe({"method": "zero_shot", "data": {"source": "captions", "path": str(twice)}}).data, 0)
    table = write_table(tmp_path / "train.tsv", rows)
    with pytest.raises(DataError) as caught:  # the same file by another path: the test split would be trained on
        load_data(load_recipe({"method": "zero_shot", "data": {"source": "captions", "path": str(table),
                                                                "eval_path": f"{tmp_path}/./train.tsv"}}).data, 0)
    assert str(caught.value) == (f"data.eval_path: '{tmp_path}/./train.tsv' and data.path '{table}' share 1 file(s) "
                                 f"(first: '{tmp_path}/./train.tsv'): their samples would be trained on and scored "
                                 "as held out; give data.eval_path files of its own")


# --- WebDataset shards ------------------------------------------------------------------------------------------


def write_shards(root: Path, prefix: str, rows, images: Path, per_shard: int, json_meta: bool = False,
                 member: str = "txt") -> str:
    """Shards as webdataset's ShardWriter writes them: `key.png` + `key.txt` (the caption; `member="cls"`: the colour
    as the label, ImageNet-style), or `key.json` holding both, per sample."""
    import webdataset as wds

    with wds.ShardWriter(str(root / f"{prefix}-%04d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (name, caption, colour) in enumerate(rows):
            sample = {"__key__": f"sample{i:05d}", "png": (images / name).read_bytes()}
            if json_meta:
                sample["json"] = json.dumps({"caption": caption, "colour": colour}).encode()
            else:
                sample[member] = colour if member == "cls" else caption
            sink.write(sample)
    count = -(-len(rows) // per_shard)
    return str(root / f"{prefix}-{{0000..{count - 1:04d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, str]:
    pytest.importorskip("webdataset", reason="WebDataset shards need the webdataset package (mmpeft[webdataset])")
    root = tmp_path_factory.mktemp("shards")
    train = write_shards(root, "train", captioned_images(root / "img", 24, seed=0), root / "img", per_shard=6)
    held_out = write_shards(root, "eval", captioned_images(root / "img", 12, seed=1), root / "img", per_shard=12,
                            json_meta=True)
    return train, held_out


def test_shards_read_in_place_with_a_held_out_pattern(shards):
    train, held_out = shards
    assert train.endswith("train-{0000..0003}.tar")
    data = load_data(load_recipe({"method": "zero_shot", "data": {
        "source": "webdataset", "path": train, "eval_path": held_out, "split": {"val": 0.0}}}).data, 0)
    assert data.info["counts"] == {"train": 24, "val": 0, "test": 12} and data.info["labelled"] is False
    assert all(isinstance(e.image, ShardImage) for e in data.train + data.test)
    item = data.dataset("test")[0]
    assert item["image"].size == (12, 12) and item["text"].startswith("a ")  # json caption of the held-out shard
    again = load_data(load_recipe({"method": "zero_shot", "data": {
        "source": "webdataset", "path": train, "eval_path": held_out, "split": {"val": 0.0}}}).data, 0)
    assert data.info["fingerprints"] == again.info["fingerprints"]


def test_shards_train_contrastively(shards, tiny_clip_dir, tmp_path):
    train, held_out = shards
    metrics = mmpeft.run(caption_recipe({"source": "webdataset", "path": train, "eval_path": held_out,
                                         "split": {"val": 0.0}}, tiny_clip_dir, tmp_path, epochs=2))
    assert metrics["train"]["steps"] == 6 and "skipped" in metrics["test"]
    assert metrics["retrieval"]["test"]["image_to_text"]["queries"] == 12


def test_shard_problems_are_bad_rows_or_clear_errors(tmp_path):
    pytest.importorskip("webdataset", reason="WebDataset shards need the webdataset package (mmpeft[webdataset])")
    import webdataset as wds

    images = captioned_images(tmp_path / "img", 3)
    with wds.TarWriter(str(tmp_path / "bad-0000.tar")) as sink:
        sink.write({"__key__": "ok", "png": (tmp_path / "img" / images[0][0]).read_bytes(), "txt": "a red image"})
        sink.write({"__key__": "uncaptioned", "png": (tmp_path / "img" / images[1][0]).read_bytes()})
        sink.write({"__key__": "textonly", "txt": "a blue image"})
        sink.write({"__key__": "otherkey", "png": (tmp_path / "img" / images[2][0]).read_bytes(),
                    "json": json.dumps({"alt_text": "a green image"})})
    spec = load_recipe({"method": "zero_shot", "data": {"source": "webdataset",
                                                        "path": str(tmp_path / "bad-0000.tar")}}).data
    with pytest.raises(DataError) as caught:
        load_data(spec, 0)
    assert "bad-0000.tar:uncaptioned: no caption" in str(caught.value)
    assert "bad-0000.tar:textonly: no image member" in str(caught.value)
    assert ("bad-0000.tar:otherkey: no caption (no .txt member, and the json has no 'caption' or 'text' key; its keys: "
            "alt_text)") in str(caught.value)
    missing = load_recipe({"method": "zero_shot", "data": {"source": "webdataset",
                                                           "path": str(tmp_path / "bad-{0000..0002}.tar")}}).data
    with pytest.raises(DataError, match="2 of 3 shards do not exist"):
        load_data(missing, 0)


@pytest.mark.parametrize(("pattern", "message"), [
    ("bad-{0000..0001.tar", "'{}/bad-{{0000..0001.tar': unbalanced braces; a shard range is written like "
                            "train-{{0000..0009}}.tar"),
    ("bad-{0000..}.tar", "do not exist (first: '{}/bad-{{0000..}}.tar'); its braces did not expand"),
    ("nope-*.tar", "do not exist (first: '{}/nope-*.tar'); the glob matches no file"),
    ("", "do not exist (first: '{}'); it is a folder: name its shards, e.g. '{}/*.tar'"),
], ids=["unbalanced", "open-range", "empty-glob", "folder"])
def test_shard_patterns_that_name_no_shard_say_why(tmp_path, pattern, message):
    pytest.importorskip("webdataset", reason="WebDataset shards need the webdataset package (mmpeft[webdataset])")
    path = str(tmp_path / pattern) if pattern else str(tmp_path)
    spec = load_recipe({"method": "zero_shot", "data": {"source": "webdataset", "path": path}}).data
    with pytest.raises(DataError) as caught:
        load_data(spec, 0)
    assert message.format(tmp_path, tmp_path) in str(caught.value)


def test_shards_held_out_from_themselves_are_refused_and_odd_captions_read(tmp_path):
    pytest.importorskip("webdataset", reason="WebDataset shards need the webdataset package (mmpeft[webdataset])")
    import webdataset as wds

    rows = captioned_images(tmp_path / "img", 6)
    train = write_shards(tmp_path, "train", rows, tmp_path / "img", per_shard=3)
    spec = load_recipe({"method": "zero_shot", "data": {"source": "webdataset", "path": train,
                                                        "eval_path": str(tmp_path / "train-0001.tar")}}).data
    with pytest.raises(DataError, match=r"data.eval_path: .* and data.path .* share 1 file\(s\) \(first: "):
        load_data(spec, 0)
    with wds.TarWriter(str(tmp_path / "latin-0000.tar")) as sink:  # a latin-1 caption: read as the stream reads it
        for i, (name, caption, _) in enumerate(rows):
            text = "café".encode("latin-1") if i == 0 else caption.encode()
            sink.write({"__key__": f"s{i}", "png": (tmp_path / "img" / name).read_bytes(), "txt": text})
    data = load_data(load_recipe({"method": "zero_shot", "data": {
        "source": "webdataset", "path": str(tmp_path / "latin-0000.tar"), "split": {"val": 0.0, "test": 0.5}}}).data, 0)
    assert "caf\ufffd" in [e.text for e in data.train + data.test]
    with wds.TarWriter(str(tmp_path / "many-0000.tar")) as sink:  # several captions in one json: not one caption
        for i, (name, caption, _) in enumerate(rows):
            meta = {"caption": [caption, "another"] if i == 0 else caption}
            sink.write({"__key__": f"s{i}", "png": (tmp_path / "img" / name).read_bytes(), "json": json.dumps(meta)})
    with pytest.raises(DataError, match=r"many-0000.tar:s0: json 'caption' is a list, not one caption or label"):
        load_data(load_recipe({"method": "zero_shot", "data": {"source": "webdataset",
                                                               "path": str(tmp_path / "many-0000.tar")}}).data, 0)


def test_a_caption_table_converts_to_shards_that_read_back(tmp_path):
    pytest.importorskip("webdataset", reason="WebDataset shards need the webdataset package (mmpeft[webdataset])")
    from mmpeft.data.write_shards import main

    rows = captioned_images(tmp_path, 7)
    table = write_table(tmp_path / "labelled.tsv", rows, labels=True)
    main([str(table), str(tmp_path / "out" / "part-%04d.tar"), "--per-shard", "3"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-0000.tar", "part-0001.tar", "part-0002.tar"]
    spec = load_recipe({"method": "zero_shot", "data": {"source": "webdataset", "path": str(tmp_path / "out" / "*.tar"),
                                                        "split": {"val": 0.0, "test": 0.4}}}).data
    data = load_data(spec, 0)  # the label column became key.cls members: labelled shards
    assert data.info["labelled"] is True and data.labels.names == ["blue", "green", "red"]
    every = data.dataset("train")
    texts = sorted(every[i]["text"] for i in range(len(every))) + sorted(e.text for e in data.test)
    assert sorted(texts) == sorted(caption for _, caption, _ in rows)


def test_writing_shards_refuses_a_bad_pattern_or_table_and_leaves_no_half_written_shards(tmp_path, capsys,
                                                                                           monkeypatch):
    wds = pytest.importorskip("webdataset", reason="WebDataset shards need the webdataset package")
    from mmpeft.data.write_shards import main

    table = write_table(tmp_path / "t.tsv", captioned_images(tmp_path, 7))
    header_only = tmp_path / "h.tsv"
    header_only.write_text("filepath\ttitle\n")
    for args, message in (([table, "out/x.tar"], "'out/x.tar': the output pattern needs one printf field"),
                          ([table, "out/x-%04d.tar", "--per-shard", "0"], "--per-shard: 0; a shard holds at least 1"),
                          ([header_only, "out/x-%04d.tar"], "h.tsv: no rows below the header")):
        with pytest.raises(SystemExit) as code:
            main([str(arg) for arg in args])
        assert code.value.code == 2 and message in capsys.readouterr().err
    calls = []
    original = wds.ShardWriter.write

    def write_until_the_disk_fills(self, sample):
        calls.append(sample["__key__"])
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return original(self, sample)

    monkeypatch.setattr(wds.ShardWriter, "write", write_until_the_disk_fills)
    with pytest.raises(OSError):
        main([str(table), str(tmp_path / "out" / "part-%04d.tar"), "--per-shard", "3"])
    assert list((tmp_path / "out").iterdir()) == []
