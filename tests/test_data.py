"""mmpeft.data: sources, bad rows, splits, k-shot, digits cache, shifts, augmentation. Offline, CPU, seconds."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmpeft.data import (
    SHIFTS,
    DataError,
    Example,
    ImageDataset,
    LabelSet,
    apply_shifts,
    collate_images,
    k_shot,
    load_data,
    load_image,
    parse_shift,
    split_examples,
)
from mmpeft.data import digits as digits_module
from mmpeft.specs import AugmentSpec, DataSpec, SplitSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def write_image(path: Path, value: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for c, (label, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / label / f"{i:03d}.png", value=100 * c + i)
    return root


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory):
    """Build the digits folder once for the module, in a temporary cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMPEFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield digits_module.prepare_digits()


# ---------------------------------------------------------------- sources


def test_folder_source_labels(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", {"dog": 8, "cat": 8, "class10": 8, "class2": 8})
    (root / "cat" / "notes.txt").write_text("not an image")
    data = load_data(DataSpec(source="folder", path=str(root), split=SplitSpec(val=0.25, test=0.25)), seed=0)
    assert data.labels.keys == ["cat", "class2", "class10", "dog"]  # natural order
    assert data.info["counts"] == {"train": 16, "val": 8, "test": 8}
    assert all(isinstance(e.image, str) for e in data.train)  # paths stay paths
    for example in data.train + data.val + data.test:
        assert Path(example.image).parent.name == data.labels.keys[example.label]


def test_csv_source_with_captions_keeps_shared_images_in_one_split(tmp_path: Path) -> None:
    lines = ["image,label,text"]
    for label in ("cat", "dog"):
        for i in range(8):
            write_image(tmp_path / "img" / f"{label}{i}.png", value=i + (label == "dog") * 50)
            lines += [f"img/{label}{i}.png,{label},a {label} number {i}", f"img/{label}{i}.png,{label},another {i}"]
    data = load_data(DataSpec(source="csv", path=str(write_csv(tmp_path / "train.csv", lines)),
                              split=SplitSpec(val=0.25, test=0.25)), seed=1)
    assert data.labels.keys == ["cat", "dog"]
    assert len(data.train) + len(data.val) + len(data.test) == 32
    assert all(e.text for e in data.train)
    images = [{e.image for e in split} for split in (data.train, data.val, data.test)]
    assert not (images[0] & images[1] or images[0] & images[2] or images[1] & images[2])


def test_jsonl_source_and_image_root(tmp_path: Path) -> None:
    root = tmp_path / "pictures"
    records = []
    for i in range(12):
        label = ["ant", "bee", "wasp"][i % 3]
        write_image(root / f"{i}.png", value=i)
        records.append(json.dumps({"file": f"{i}.png", "kind": label}))
    path = tmp_path / "meta" / "rows.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(records) + "\n\n")
    spec = DataSpec(source="jsonl", path=str(path), image_root=str(root), image_column="file", label_column="kind",
                    label_names={"ant": "small ant"}, split=SplitSpec(val=0, test=0.25))
    data = load_data(spec, seed=0)
    assert data.labels.names == ["small ant", "bee", "wasp"]
    assert data.labels.prompts(0) == ["a photo of a small ant."]
    assert len(data.val) == 0 and len(data.test) == 3 and len(data.train) == 9


def test_jsonl_broken_line_is_a_bad_row(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    path = tmp_path / "rows.jsonl"
    path.write_text('{"image": "a.png", "label": "cat"}\n{"image": "a.png", "label": \n["a.png"]\n')
    with pytest.raises(DataError, match=r"2 bad rows .*line 2: not valid JSON.*line 3: expected a JSON object"):
        load_data(DataSpec(source="jsonl", path=str(path)), seed=0)


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "rows.csv", ["img,label", "a.png,cat"])
    with pytest.raises(DataError, match=r"data.image_column: no column 'image'.*did you mean 'img'"):
        load_data(DataSpec(source="csv", path=str(path)), seed=0)


def test_hf_disk_source_maps_classlabel_names(tmp_path: Path) -> None:
    import datasets

    root = make_folder(tmp_path / "imgs", {"cat": 6, "dog": 6})
    images = [str(p) for p in sorted(root.rglob("*.png"))]
    table = datasets.Dataset.from_dict(
        {"image": images, "label": [0 if "cat" in p else 1 for p in images]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    spec = DataSpec(source="hf_disk", path=str(tmp_path / "saved"), split=SplitSpec(val=0, test=0.5))
    data = load_data(spec, seed=0)
    assert data.labels.keys == ["cat", "dog"]
    assert len(data.train) == 6 and len(data.test) == 6
    example = data.train[0]
    assert load_image(example.image).mode == "RGB"  # bytes stored in the table, decoded only now
    with pytest.raises(DataError, match=r"no split 'trian'.*did you mean 'train'"):
        load_data(DataSpec(source="hf_disk", path=str(tmp_path / "saved"), hf_split="trian"), seed=0)


def test_hf_source_local_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    root = make_folder(tmp_path / "imgs", {"cat": 4, "dog": 4})
    data = load_data(DataSpec(source="hf", path=str(root), split=SplitSpec(val=0, test=0.5)), seed=0)
    assert data.labels.keys == ["cat", "dog"]
    assert all(isinstance(e.image, str) for e in data.train + data.test)


# ---------------------------------------------------------------- bad rows


def bad_rows_csv(tmp_path: Path) -> Path:
    """10 good rows (cat/dog) and, in order, a missing file, a corrupt file, an escaping path, an unknown label."""
    lines = ["image,label"]
    for i in range(10):
        write_image(tmp_path / "data" / f"{i}.png", value=i)
        lines.append(f"{i}.png,{'cat' if i % 2 else 'dog'}")
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    write_image(tmp_path / "outside.png")
    lines += ["gone.png,cat", "broken.png,dog", "../outside.png,cat", "0.png,cow"]
    return write_csv(tmp_path / "data" / "train.csv", lines)


def test_bad_rows_error_names_each_row_and_reason(tmp_path: Path) -> None:
    path = bad_rows_csv(tmp_path)
    spec = DataSpec(source="csv", path=str(path), classes=("cat", "dog"))
    with pytest.raises(DataError) as caught:
        load_data(spec, seed=0)
    message = str(caught.value)
    root = str(tmp_path / "data")
    assert message.startswith(f"4 bad rows in {path}: ")
    assert f"line 12: image 'gone.png' not found under {root}" in message
    assert "line 13: image" in message and "broken.png" in message and "unreadable" in message
    assert f"line 14: image path '../outside.png' escapes the image root {root}" in message
    assert "line 15: label 'cow' not in classes [cat, dog]" in message
    assert message.endswith("Fix them or set data.on_bad_rows: skip")


def test_absolute_path_outside_root_is_bad(tmp_path: Path) -> None:
    outside = write_image(tmp_path / "elsewhere" / "x.png")
    (tmp_path / "data").mkdir()
    path = write_csv(tmp_path / "data" / "rows.csv", ["image,label", f"{outside},cat"])
    with pytest.raises(DataError, match=r"line 2: image path .*x.png' escapes the image root"):
        load_data(DataSpec(source="csv", path=str(path)), seed=0)


def test_skip_drops_exactly_the_bad_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = bad_rows_csv(tmp_path)
    spec = DataSpec(source="csv", path=str(path), classes=("cat", "dog"), on_bad_rows="skip",
                    split=SplitSpec(val=0, test=0.4))
    with caplog.at_level(logging.WARNING, logger="mmpeft"):
        data = load_data(spec, seed=0)
    kept = sorted(Path(e.image).name for e in data.train + data.test)
    assert kept == sorted(f"{i}.png" for i in range(10))
    assert data.info["skipped"] == 4
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 4 bad rows" in warning and "line 15: label 'cow'" in warning


def test_label_typo_gets_did_you_mean(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    path = write_csv(tmp_path / "rows.csv", ["image,label", "a.png,dgo"])
    with pytest.raises(DataError, match=r"line 2: label 'dgo' not in classes \[cat, dog\] \(did you mean 'dog'\?\)"):
        load_data(DataSpec(source="csv", path=str(path), classes=("cat", "dog")), seed=0)


def test_empty_class_is_always_an_error(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", {"cat": 4, "dog": 4})
    for mode in ("error", "skip"):
        spec = DataSpec(source="folder", path=str(root), classes=("cat", "dog", "bird"), on_bad_rows=mode)
        with pytest.raises(DataError, match=r"1 empty class\(es\) in .*imgs: 'bird' listed in data.classes"):
            load_data(spec, seed=0)


# ---------------------------------------------------------------- splits and k-shot


def examples(counts: list[int]) -> list[Example]:
    return [Example(f"/img/{c}/{i}.png", c) for c, n in enumerate(counts) for i in range(n)]


def test_split_stratified_disjoint_deterministic() -> None:
    items = examples([40, 40, 20])
    spec = SplitSpec(val=0.2, test=0.25)
    train, val, test = split_examples(items, spec, seed=0)
    ids = [{e.image for e in s} for s in (train, val, test)]
    assert sum(map(len, ids)) == 100 and len(ids[0] | ids[1] | ids[2]) == 100
    assert [sum(e.label == c for e in test) for c in range(3)] == [10, 10, 5]  # stratified
    assert [sum(e.label == c for e in val) for c in range(3)] == [8, 8, 4]
    assert split_examples(items, spec, seed=0) == (train, val, test)
    assert split_examples(items, spec, seed=1)[2] != test
    assert split_examples(items, SplitSpec(val=0, test=0.25), seed=0)[1] == []


def test_split_too_small_names_classes() -> None:
    with pytest.raises(DataError, match=r"cannot split .*'b' 1"):
        split_examples(examples([10, 1]), SplitSpec(), seed=0, names=["a", "b"])


def test_k_shot_exact_nested_deterministic() -> None:
    train = examples([20, 20, 20])
    samples = {k: k_shot(train, k, seed=3) for k in (1, 2, 4, 8, 16)}
    for k, sample in samples.items():
        assert [sum(e.label == c for e in sample) for c in range(3)] == [k, k, k]
        assert sample == k_shot(train, k, seed=3)
    for small, large in zip((1, 2, 4, 8), (2, 4, 8, 16)):
        assert set(samples[small]) <= set(samples[large])
    assert k_shot(train, 4, seed=4) != samples[4]
    with pytest.raises(DataError, match=r"data.shots=25: 3 class\(es\).*'b' has 20"):
        k_shot(train, 25, seed=0, names=["a", "b", "c"])


def test_load_data_k_shot_on_train_only(digits_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMPEFT_CACHE", str(digits_cache.parent.parent))
    data = load_data(DataSpec(shots=4), seed=0)
    full = load_data(DataSpec(), seed=0)
    assert data.info["class_counts"]["train"] == [4] * 10
    assert data.test == full.test and set(data.train) <= set(full.train)


# ---------------------------------------------------------------- digits


def test_digits_prepared_once(digits_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMPEFT_CACHE", str(digits_cache.parent.parent))
    files = sorted(digits_cache.rglob("*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in digits_cache.iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    with Image.open(files[0]) as image:
        assert image.mode == "L" and image.size == (8, 8)
    stamp = (digits_cache / digits_module.READY).stat().st_mtime_ns

    def no_rebuild(folder: Path) -> None:
        raise AssertionError("digits rebuilt")

    monkeypatch.setattr(digits_module, "_write_digits", no_rebuild)
    data = load_data(DataSpec(split=SplitSpec(val=0.1, test=0.2)), seed=0)
    assert (digits_cache / digits_module.READY).stat().st_mtime_ns == stamp
    assert len(data.labels) == 10 and data.labels.names[0] == "zero" and data.labels.names[9] == "nine"
    assert sum(data.info["counts"].values()) == 1797


def test_digits_pixels_match_sklearn(digits_cache: Path) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    label = int(raw.target[5])
    with Image.open(digits_cache / str(label) / "0005.png") as image:
        assert np.array_equal(np.asarray(image), np.rint(raw.images[5] * 255 / 16).astype(np.uint8))


# ---------------------------------------------------------------- labels


def test_label_set_order_names_prompts() -> None:
    spec = DataSpec(classes=("dog", "cat"), label_names={"cat": "kitten"},
                    label_prompts={"dog": ("a dog.", "a puppy.")}, templates=("a {label}.", "art of a {label}."))
    labels = LabelSet.from_spec(spec, ["cat", "dog"])
    assert labels.keys == ["dog", "cat"] and labels.names == ["dog", "kitten"] and len(labels) == 2
    assert labels.index("cat") == 1
    assert labels.prompts(0) == ["a dog.", "a puppy."]
    assert labels.prompts(1) == ["a kitten.", "art of a kitten."]
    with pytest.raises(DataError, match="did you mean 'cat'"):
        labels.index("cta")


# ---------------------------------------------------------------- shifts and augmentation


def test_shifts_deterministic_and_compose() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    for name in SHIFTS:
        first, again = apply_shifts(image, (name,), 5), apply_shifts(image, (name,), 5)
        assert np.array_equal(np.asarray(first), np.asarray(again)), name
    rot = apply_shifts(image, parse_shift("rot90+rot90"), 0)
    assert np.array_equal(np.asarray(rot), np.asarray(apply_shifts(image, ("rot180",), 0)))
    assert apply_shifts(image, ("rot90",), 0).size == (9, 7)
    inverted = np.asarray(apply_shifts(image, ("invert",), 0)).astype(int)
    assert np.array_equal(inverted, 255 - np.asarray(image).astype(int))
    noisy = [np.asarray(apply_shifts(image, ("noise",), i)) for i in (1, 2)]
    assert not np.array_equal(noisy[0], noisy[1])
    assert parse_shift(["rot90", "invert+blur"]) == ("rot90", "invert", "blur")


def test_bad_shift_name_did_you_mean() -> None:
    with pytest.raises(ValueError, match=r"unknown image shift 'rot9'.*did you mean 'rot90'.*valid shifts: none"):
        parse_shift("rot9+invert")
    with pytest.raises(ValueError, match="did you mean 'invert'"):
        load_data(DataSpec(shift=("invrt",)), seed=0)


def test_augmentation_depends_on_seed_epoch_index_only(tmp_path: Path) -> None:
    items = [Example(str(write_image(tmp_path / f"{i}.png", value=i, size=32)), i % 2) for i in range(4)]
    spec = AugmentSpec(random_resized_crop=True, crop_scale=(0.3, 1.0), horizontal_flip=True, color_jitter=0.4)

    def pixels(seed: int, epoch: int, index: int) -> np.ndarray:
        dataset = ImageDataset(items, augment=spec, seed=seed)
        dataset.set_epoch(epoch)
        return np.asarray(dataset[index]["image"])

    assert np.array_equal(pixels(0, 1, 2), pixels(0, 1, 2))  # a fresh dataset (a resume) repeats it
    assert not np.array_equal(pixels(0, 1, 2), pixels(0, 2, 2))
    assert not np.array_equal(pixels(0, 1, 2), pixels(1, 1, 2))
    assert pixels(0, 1, 2).shape == (32, 32, 3)
    plain = ImageDataset(items)
    assert np.array_equal(np.asarray(plain[2]["image"]), np.asarray(load_image(items[2].image)))
    with pytest.raises(ValueError, match="crop_scale"):
        ImageDataset(items, augment=AugmentSpec(random_resized_crop=True, crop_scale=(0.9, 0.1)))


def test_dataset_items_and_collate(tmp_path: Path) -> None:
    gray = tmp_path / "g.png"
    Image.fromarray(np.zeros((6, 6), dtype=np.uint8)).save(gray)
    items = [Example(str(gray), 1, "a caption"), Example(str(gray), 0, None)]
    dataset = ImageDataset(items, shifts=("invert",))
    item = dataset[0]
    assert item["image"].mode == "RGB" and item["label"] == 1 and item["index"] == 0 and item["text"] == "a caption"
    assert np.asarray(item["image"]).min() == 255

    def preprocess(images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32)).permute(2, 0, 1) for i in images])

    batch = collate_images(preprocess)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 6, 6)
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert batch["index"].tolist() == [0, 1]
    assert batch["texts"] == ["a caption", None]
