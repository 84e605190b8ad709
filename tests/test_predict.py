"""`mmpeft predict` on run folders and both export kinds (tiny CLIP and LLaVA), new labels at predict time, folders
with an unreadable image, and the merged exports in transformers' own pipelines."""

from __future__ import annotations

import json
import shutil

import pytest

import mmpeft
from mmpeft.cli import main

TASK = {"question": "Which colour fills this picture?", "answer_template": "It is {label}."}


# name -> (backbone, method, export kinds): lora saves a peft adapter; bitfit and the linear probe mmpeft's own format
RUNS = {"clip": ("clip", {"name": "lora", "r": 4, "alpha": 8}, ("adapter", "merged")),
        "llava": ("llava", {"name": "lora", "r": 4, "alpha": 8}, ("adapter", "merged")),
        "siglip": ("siglip", {"name": "bitfit"}, ("adapter",)),
        "probe": ("clip", {"name": "linear_probe"}, ("adapter",))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, color_folder):
    """exported(name) -> {"run", "adapter", "merged"} folders of one tiny run, made once per module on first use."""
    from mmpeft.testing import tiny_backbone

    root, made = tmp_path_factory.mktemp("predict-runs"), {}

    def make(name: str) -> dict:
        if name not in made:
            kind, method, exports = RUNS[name]
            generative = kind == "llava"
            recipe = {"name": name, "seed": 0, "backbone": {"id": str(tiny_backbone(kind))},
                      "data": {"source": "folder", "path": str(color_folder),
                               "templates": ["a photo of a {label} image."], "split": {"val": 0.0, "test": 0.25},
                               "shots": 4, **(TASK if generative else {})},
                      "method": method,
                      "train": {"epochs": 1 if generative else 3, "batch_size": 12, "lr": 0.02, "warmup_ratio": 0.0},
                      "eval": {"batch_size": 32, "zero_shot": False, "length_normalize": generative},
                      "output": {"dir": str(root), "name": name}}
            mmpeft.run(recipe)
            folders = {"run": root / name}
            for how in exports:
                folders[how] = root / f"{name}-{how}"
                mmpeft.export(folders["run"], folders[how], how=how)
            made[name] = folders
        return made[name]

    return make


@pytest.fixture(scope="module")
def images(tmp_path_factory, color_folder):
    """Nine test images in nested folders, plus one file that is not an image."""
    folder = tmp_path_factory.mktemp("to-predict")
    for name in ("red", "green", "blue"):
        (folder / name).mkdir()
        for source in sorted((color_folder / name).iterdir())[-3:]:
            shutil.copy(source, folder / name / source.name)
    (folder / "blue" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return folder


def top1(rows: list[dict]) -> dict[str, str]:
    return {row["path"]: row["labels"][0]["label"] for row in rows if "labels" in row}


def test_dual_encoder_predicts_alike_from_run_adapter_and_merged_export(exported, images, tmp_path):
    folders = exported("clip")
    rows = {kind: mmpeft.predict(folder, images, top_k=2) for kind, folder in folders.items()}
    assert len(rows["run"]) == 10
    broken = [row for row in rows["run"] if "error" in row]
    assert [row["path"].endswith("broken.png") for row in broken] == [True] and "cannot read" in broken[0]["error"]
    first = rows["run"][0]
    assert [e["label"] for e in first["labels"]] != [] and len(first["labels"]) == 2
    assert sum(e["score"] for e in first["labels"]) <= 1 + 1e-6
    assert top1(rows["run"]) == top1(rows["adapter"]) == top1(rows["merged"]) and len(top1(rows["run"])) == 9
    truth = {path: path.split("/")[-2] for path in top1(rows["run"])}
    assert sum(top1(rows["run"])[p] == truth[p] for p in truth) >= 6  # the trained model has learned the colours


def test_siglip_trained_state_and_a_linear_probe_predict_alike_from_run_and_exports(exported, images):
    folders = exported("siglip")  # bitfit: the trained biases in mmpeft's format, onto the base
    rows = {kind: top1(mmpeft.predict(folder, images)) for kind, folder in folders.items()}
    assert rows["run"] == rows["adapter"] and len(rows["run"]) == 9
    probe = exported("probe")
    rows = {kind: mmpeft.predict(folder, images / "red", top_k=3) for kind, folder in probe.items()}
    assert rows["run"] == rows["adapter"] and [e["label"] for e in rows["run"][0]["labels"]] != []
    with pytest.raises(ValueError, match=r"classifies with a trained head over its own 3 classes \(blue, green, red\)"):
        mmpeft.predict(probe["adapter"], images / "red", labels=["cat", "dog"])


def test_new_labels_at_predict_time_and_the_command_line(exported, images, tmp_path, capsys):
    folders = exported("clip")
    rows = mmpeft.predict(folders["merged"], images / "red", labels=["crimson", "red", "teal"], top_k=3)
    assert {e["label"] for e in rows[0]["labels"]} == {"crimson", "red", "teal"}
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# colours\nred\nblue\n\n")
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(folders["adapter"]), str(images), "--labels-file", str(labels_file),
                 "--top-k", "1", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 10 and sum("error" in line for line in lines) == 1
    assert all(line["labels"][0]["label"] in ("red", "blue") for line in lines if "labels" in line)
    printed = capsys.readouterr().out
    assert "9 image(s) predicted, 1 unreadable and skipped" in printed and "SKIPPED" in printed
    assert main(["predict", str(folders["run"]), str(tmp_path / "missing.png")]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(images)]) == 2
    assert "neither a run folder" in capsys.readouterr().err


def test_generative_answers_and_label_scores_alike_from_run_and_exports(exported, images):
    folders = exported("llava")
    answers = {kind: mmpeft.predict(folder, images / "green") for kind, folder in folders.items()}
    assert all(set(row) == {"path", "answer"} for row in answers["run"]) and len(answers["run"]) == 3
    assert answers["run"] == answers["adapter"] == answers["merged"]
    scored = {kind: mmpeft.predict(folder, images / "blue", labels=["red", "green", "blue"])
              for kind, folder in folders.items()}
    assert top1(scored["run"]) == top1(scored["adapter"]) == top1(scored["merged"]) and len(top1(scored["run"])) == 3
    other = mmpeft.predict(folders["merged"], images / "green", question="Describe it.")
    assert len(other) == 3 and all("answer" in row for row in other)


def test_merged_clip_export_in_the_zero_shot_pipeline(exported, images):
    from transformers import pipeline

    folders = exported("clip")
    classify = pipeline("zero-shot-image-classification", model=str(folders["merged"]))
    files = sorted(str(p) for p in images.rglob("*.png") if p.name != "broken.png")
    names = ["red", "green", "blue"]
    ours = top1(mmpeft.predict(folders["merged"], files, labels=names))
    theirs = {path: classify(path, candidate_labels=names, hypothesis_template="a photo of a {} image.")[0]["label"]
              for path in files}
    assert theirs == ours
    card = (folders["merged"] / "README.md").read_text()  # the card's own pipeline snippet runs as written
    snippet = card.split("In a transformers pipeline:")[1].split("```python")[1].split("```")[0]
    printed = []
    exec(snippet.replace("path/to/this/folder", str(folders["merged"])).replace("image.png", files[0]),
         {"print": printed.append})
    assert printed[0][0]["label"] == ours[files[0]]


def test_merged_llava_export_in_the_image_text_to_text_pipeline(exported, images):
    from PIL import Image
    from transformers import pipeline

    folders = exported("llava")
    chat = pipeline("image-text-to-text", model=str(folders["merged"]))
    ours = mmpeft.predict(folders["run"], images / "green")
    for row in ours:
        messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(row["path"]).convert("RGB")},
                                                 {"type": "text", "text": TASK["question"]}]}]
        answer = chat(text=messages, max_new_tokens=16, generate_kwargs={"do_sample": False}, return_full_text=False)
        assert answer[0]["generated_text"].strip() == row["answer"]


# hostile `mmpeft predict` arguments -> a fragment of the one-line error ({tmp}: a scratch folder, {image}: an image)
REFUSED = {
    "labels_empty": (["--labels", ""], "labels: none given"),
    "labels_only_commas": (["--labels", " , "], "labels: none given"),
    "one_label_always_scores_1": (["--labels", "cat"], "only one label ('cat')"),
    "labels_file_missing": (["--labels-file", "{tmp}/missing.txt"], "labels file {tmp}/missing.txt does not exist"),
    "labels_file_is_a_folder": (["--labels-file", "{tmp}"], "labels file {tmp} is a folder"),
    "labels_file_empty": (["--labels-file", "{tmp}/empty.txt"], "empty.txt holds no labels"),
    "labels_file_only_comments": (["--labels-file", "{tmp}/comments.txt"], "comments.txt holds no labels"),
    "labels_file_latin1": (["--labels-file", "{tmp}/latin1.txt"], "latin1.txt is not UTF-8 (byte 0xe9 at offset 3)"),
    "out_is_a_folder": (["--out", "{tmp}"], "out: {tmp} is a folder"),
    "out_is_the_image": (["--out", "{image}"], "is one of the images to predict"),
    "out_inside_a_file": (["--out", "{image}/p.jsonl"], "out: {image} is a file, so"),
    "empty_question": (["--question", ""], "question: empty"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hostile_predict_arguments_get_one_line_and_touch_no_file(case, exported, images, tmp_path, capsys):
    arguments, fragment = REFUSED[case]
    image = tmp_path / "one.png"
    shutil.copy(images / "red" / sorted(p.name for p in (images / "red").iterdir())[0], image)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "comments.txt").write_text("# nothing\n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\nth\xe9\n".encode("latin-1"))
    before = sorted(p.name for p in tmp_path.iterdir()), image.read_bytes()
    fill = {"tmp": str(tmp_path), "image": str(image)}
    code = main(["predict", str(exported("clip")["run"]), str(image), *[a.format(**fill) for a in arguments]])
    err = capsys.readouterr().err
    assert code == 2 and fragment.format(**fill) in err and "Traceback" not in err
    assert (sorted(p.name for p in tmp_path.iterdir()), image.read_bytes()) == before


@pytest.mark.parametrize("arguments, error, fragment", [
    ({"images": []}, ValueError, "images: give at least one"),
    ({"images": ""}, ValueError, "images: an empty path"),
    ({"images": 5}, TypeError, "images: int is not a path or a list of paths"),
    ({"images": ["a.png", None]}, TypeError, "images: None is not a path"),
    ({"top_k": "2"}, TypeError, "top_k: '2' is not a whole number"),
    ({"top_k": 2.5}, TypeError, "top_k: 2.5 is not a whole number"),
    ({"top_k": 0}, ValueError, "top_k: 0 must be >= 1"),
    ({"batch_size": None}, TypeError, "batch_size: None is not a whole number"),
    ({"labels": []}, ValueError, "labels: none given"),
    ({"labels": ["a", "", "b"]}, ValueError, "labels: an empty label in ['a', '', 'b']"),
])
def test_predict_api_refuses_bad_arguments_clearly(arguments, error, fragment, exported, images):
    given = {"images": images / "red", **arguments}
    with pytest.raises(error) as raised:
        mmpeft.predict(exported("clip")["run"], **given)
    assert fragment in str(raised.value)


def test_predict_source_that_does_not_exist_and_unreadable_image_messages(tmp_path, capsys):
    from mmpeft.artifacts.predict import iter_labels_file, read_image

    assert main(["predict", str(tmp_path / "missing-run"), str(tmp_path)]) == 2
    assert "images: no image files" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"images: no image files \(.*\) in .*; give image files or folders"):
        mmpeft.predict(tmp_path / "missing-run", tmp_path)  # nothing to predict: not an empty success
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"missing-run does not exist; give a run folder"):
        mmpeft.predict(tmp_path / "missing-run", tmp_path)
    with pytest.raises(ValueError, match=r"only one label \('cat'\)"):  # checked before any model loads
        mmpeft.predict(tmp_path / "missing-run", tmp_path, labels=["cat"])
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "recipe.yaml").write_text("method: lora\n")
    with pytest.raises(ValueError, match=r"metrics.json is missing: the run did not finish; continue it with "
                                         r"`mmpeft run --resume .*unfinished`, then export or predict with it"):
        mmpeft.predict(tmp_path / "unfinished", tmp_path)
    (tmp_path / "grid" / "cells").mkdir(parents=True)  # a grid folder: its cells are the run folders
    shutil.copytree(tmp_path / "unfinished", tmp_path / "grid" / "cells" / "lora-seed0")
    with pytest.raises(ValueError, match=r"grid is a grid folder; predict with one of its cells, e.g. .*lora-seed0"):
        mmpeft.predict(tmp_path / "grid", tmp_path / "zero.png")
    assert read_image(tmp_path / "zero.png")[1].startswith("cannot read image: UnidentifiedImageError: cannot "
                                                            "identify image file")
    (tmp_path / "bom.txt").write_bytes("\ufeffred\nblue\n".encode("utf-8"))  # Windows Notepad's UTF-8
    assert list(iter_labels_file(tmp_path / "bom.txt")) == ["red", "blue"]
    from mmpeft.artifacts.predict import image_paths

    shutil.copy(tmp_path / "zero.png", tmp_path / ".hidden.png")
    (tmp_path / ".thumbnails").mkdir()  # a hidden folder's images are skipped like hidden files, as data sources do
    shutil.copy(tmp_path / "zero.png", tmp_path / ".thumbnails" / "zero.png")
    assert image_paths(tmp_path) == [tmp_path / "zero.png"]


def test_a_zero_shot_run_predicts_with_its_base(color_folder, tiny_clip_dir, images, tmp_path):
    # the web workbench lists every finished run as a source; a zero-shot one used to be refused "nothing to export"
    mmpeft.run({"name": "zs", "seed": 0, "backbone": {"id": str(tiny_clip_dir)},
                "data": {"source": "folder", "path": str(color_folder), "templates": ["a photo of a {label} image."],
                         "split": {"val": 0.0, "test": 0.25}},
                "method": {"name": "zero_shot"}, "eval": {"batch_size": 32},
                "output": {"dir": str(tmp_path), "name": "zs"}})
    rows = mmpeft.predict(tmp_path / "zs", images / "red", top_k=3)
    assert len(rows) == 3 and all({e["label"] for e in row["labels"]} == {"red", "green", "blue"} for row in rows)
    with pytest.raises(ValueError, match="nothing was trained, so there is nothing to export"):
        mmpeft.export(tmp_path / "zs", tmp_path / "out")


def test_an_export_whose_base_moved_predicts_with_base(exported, images, tiny_clip_dir, tmp_path, capsys):
    folders = exported("clip")
    moved = tmp_path / "moved"
    shutil.copytree(folders["adapter"], moved)
    manifest = json.loads((moved / "mmpeft_export.json").read_text())
    for part in ("base", "backbone"):
        manifest[part]["id"] = str(tmp_path / "base-that-moved")
    (moved / "mmpeft_export.json").write_text(json.dumps(manifest))
    assert main(["predict", str(moved), str(images / "red")]) == 2
    assert "is not on this machine" in capsys.readouterr().err  # it names --base, which predict had not
    rows = mmpeft.predict(moved, images / "red", base=str(tiny_clip_dir))
    assert main(["predict", str(moved), str(images / "red"), "--base", str(tiny_clip_dir)]) == 0
    assert top1(rows) == top1(mmpeft.predict(folders["adapter"], images / "red")) and len(rows) == 3
    assert main(["predict", str(folders["run"]), str(images / "red"), "--base", str(tiny_clip_dir)]) == 2
    assert "--base is for export folders" in capsys.readouterr().err


def test_a_run_folder_predicts_after_its_data_moved(exported, images, tmp_path):
    """The label set is recorded in the run folder (labels.json): predict does not read the training data again."""
    import yaml

    run = exported("clip")["run"]
    moved = tmp_path / "clip"
    shutil.copytree(run, moved)
    recipe = yaml.safe_load((moved / "recipe.yaml").read_text())
    recipe["data"]["path"] = str(tmp_path / "gone")
    (moved / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert json.loads((moved / "labels.json").read_text())["keys"] == ["blue", "green", "red"]
    assert top1(mmpeft.predict(moved, images)) == top1(mmpeft.predict(run, images))
    from mmpeft.data import DataError

    with pytest.raises(DataError, match=r"data.path: image folder .*gone' does not exist"):  # export verifies on it
        mmpeft.export(moved, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_a_caption_only_run_predicts_given_labels_and_exports(tmp_path, images, capsys, monkeypatch):
    """Caption-only data has no classes: predict used to crash in the tokenizer (IndexError) on the empty label set,
    and export crashed the same way in its verification, then refused the run as damaged (no test accuracy)."""
    from mmpeft.core.io import PROJECT_ROOT

    monkeypatch.chdir(PROJECT_ROOT)
    mmpeft.run(PROJECT_ROOT / "recipes" / "captions-clip.yaml",
               ["train.epochs=1", "eval.zero_shot=false", f"output.dir={tmp_path}", "output.name=cap"])
    run, merged = tmp_path / "cap", tmp_path / "cap-merged"
    assert main(["predict", str(run), str(images / "red")]) == 2
    assert "was trained on caption-only data, which has no classes to score" in capsys.readouterr().err
    mmpeft.export(run, merged, how="merged")
    card = (merged / "README.md").read_text()
    assert "name: test image->text R@1 (cap)" in card and "fine-tuned R@1" in card
    assert "name: image-text retrieval" in card and "name: image classification" not in card
    given = ["a red square", "a blue circle"]
    assert top1(mmpeft.predict(run, images, labels=given)) == top1(mmpeft.predict(merged, images, labels=given))
    shutil.copytree(run, tmp_path / "cap-again")  # merge scores accuracy: refused up front (was an IndexError)
    with pytest.raises(ValueError, match="trained on caption-only data, which has no classes; merge scores"):
        mmpeft.merge([run, tmp_path / "cap-again"], out=tmp_path / "merged-adapter")
    assert not (tmp_path / "merged-adapter").exists()


def test_a_conversation_run_answers_and_scores_given_labels(tmp_path, images, monkeypatch):
    """A run on conversation data has no label set to read: predict used to stop reading its data again
    ("holds conversations, not labelled images")."""
    from mmpeft.core.io import PROJECT_ROOT

    monkeypatch.chdir(PROJECT_ROOT)
    mmpeft.run(PROJECT_ROOT / "recipes" / "messages-jsonl.yaml",
               ["train.epochs=1", "eval.generate=false", "eval.zero_shot=false", f"output.dir={tmp_path}",
                "output.name=chat"])
    rows = mmpeft.predict(tmp_path / "chat", images / "red", question="What colour is this image?")
    assert len(rows) == 3 and all(isinstance(row["answer"], str) for row in rows)
    rows = mmpeft.predict(tmp_path / "chat", images / "red", labels=["red", "green"])
    assert all({e["label"] for e in row["labels"]} == {"red", "green"} for row in rows)
