"""Conversation datasets as their tools write them (LLaVA-Instruct, LLaMA-Factory sharegpt/alpaca via
dataset_info.json, OpenAI/TRL messages in JSONL and a saved `datasets` table): read, every row checked before any
model loads, assistant-only labels through the chat template, and LoRA training that lowers held-out loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conversation_data import (
    conversations,
    write_images,
    write_llamafactory,
    write_llava,
    write_messages_dataset,
    write_messages_jsonl,
)
from PIL import Image

import mmpeft
from mmpeft.backbones import load_backbone
from mmpeft.backbones.generative import IGNORE_INDEX
from mmpeft.core.io import PROJECT_ROOT
from mmpeft.core.schema import RecipeError
from mmpeft.data import DataError, load_data
from mmpeft.data.conversation_data import load_conversations
from mmpeft.data.conversations import chat_messages
from mmpeft.runs.recipe import load_recipe
from mmpeft.specs import BackboneSpec, DataSpec, SplitSpec
from mmpeft.testing import tiny_backbone

END_OF_TURN = {"llava": "</s>", "qwen2vl": "<|im_end|>"}
IMAGE_TOKEN = {"llava": "<image>", "qwen2vl": "<|image_pad|>"}


@pytest.fixture(scope="module")
def colors(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("conversations")
    return root, conversations(write_images(root))


@pytest.fixture(scope="module")
def backbones() -> dict:
    return {kind: load_backbone(BackboneSpec(id=str(tiny_backbone(kind)))) for kind in END_OF_TURN}


def spec(source: str, path: Path, **keys) -> DataSpec:
    return DataSpec(source=source, path=str(path), **keys)


def bad_row_error(source: str, path: Path, **keys) -> str:
    with pytest.raises(DataError) as caught:
        load_conversations(spec(source, path, **keys), seed=0)
    return str(caught.value)


# --- every format, read as its tool writes it ---------------------------------------------------------------------
def formats(root: Path, rows: list) -> dict[str, DataSpec]:
    write_llamafactory(root, rows)
    return {"llava": spec("llava", write_llava(root, rows)),
            "llamafactory": spec("llamafactory", root / "dataset_info.json", name="colors"),
            "sharegpt": spec("sharegpt", root / "colors_sharegpt.json"),
            "messages-jsonl": spec("messages", write_messages_jsonl(root, rows)),
            "messages-strings": spec("messages", write_messages_jsonl(root, rows, parts=False)),
            "messages-hf": spec("messages", write_messages_dataset(root, rows))}


def test_every_format_reads_the_same_conversations(colors):
    root, rows = colors
    read = {name: load_conversations(data, seed=0) for name, data in formats(root, rows).items()}
    for name, splits in read.items():
        every = sorted(splits.train + splits.val + splits.test, key=lambda c: int(c.source.split()[-1]))
        assert len(every) == len(rows), name
        for conversation, (turns, images) in zip(every, rows):
            got = [(t.role, t.text.replace("<image>\n", "<image>")) for t in conversation.turns if t.role != "system"]
            assert got == [(role, text.replace("<image>\n", "<image>")) for role, text in turns], name
            assert len(conversation.images) == len(images), name
            if name != "messages-hf":  # paths, in the order written (the first image is the first placeholder's)
                assert [Path(p).name for p in conversation.images] == [Path(p).name for p in images], name
    assert [t.role for t in read["llamafactory"].train[0].turns][0] == "system"
    assert read["llava"].info["images"] == {"total": 24, "max_per_row": 2, "text_only_rows": 6}
    assert read["messages-hf"].train[1].images[0].open().size == (8, 8)  # stored in the table, read when used


def test_a_saved_table_with_one_image_column_reads_its_text_only_rows(tmp_path, colors):
    """LLaVA rows saved with `datasets` (an `image` Image column): a text-only row keeps None there, not an image."""
    import datasets

    root, _ = colors
    ask = [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "red"}]
    chat = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red"}]
    table = {"image": [str(root / "images/red-0.png"), None] * 4, "conversations": [ask, chat] * 4}
    features = datasets.Features({"image": datasets.Image(), "conversations": datasets.List(
        {"from": datasets.Value("string"), "value": datasets.Value("string")})})
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "saved"))
    read = load_conversations(spec("llava", tmp_path / "saved"), seed=0)
    assert read.info["images"] == {"total": 4, "max_per_row": 1, "text_only_rows": 4} and read.info["skipped"] == 0
    with_image = next(c for c in read.train if c.images)
    assert with_image.images[0].open().size == (8, 8)


def test_llamafactory_mllm_layout_and_alpaca(tmp_path, colors):
    """LLaMA-Factory's own mllm_demo layout (messages/role/content tags) and an alpaca entry with history."""
    root, _ = colors
    shutil.copytree(root / "images", tmp_path / "images")
    demo = [{"messages": [{"role": "user", "content": "<image>Who are they?"}, {"role": "assistant", "content": "Two."},
                          {"role": "user", "content": "What are they doing?"},
                          {"role": "assistant", "content": "Playing."}], "images": ["images/red-0.png"]}]
    alpaca = [{"instruction": "<image>Colour?", "input": "Be brief.", "output": "red", "system": "Be kind.",
               "history": [["Hi", "Hello"]], "images": ["images/red-1.png"]}]
    (tmp_path / "mllm_demo.json").write_text(json.dumps(demo * 4))
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca * 4))
    info = {"mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                          "columns": {"messages": "messages", "images": "images"},
                          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                   "assistant_tag": "assistant"}},
            "colors_alpaca": {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "query": "input",
                              "response": "output", "system": "system", "history": "history", "images": "images"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    demo_read = load_conversations(spec("llamafactory", tmp_path / "dataset_info.json", name="mllm_demo"), seed=0)
    assert [t.role for t in demo_read.train[0].turns] == ["user", "assistant", "user", "assistant"]
    direct = load_conversations(spec("sharegpt", tmp_path / "mllm_demo.json"), seed=0)  # the same file, no entry
    assert direct.train[0].turns == demo_read.train[0].turns and direct.train[0].images == demo_read.train[0].images
    alpaca_read = load_conversations(spec("llamafactory", tmp_path / "dataset_info.json", name="colors_alpaca"), 0)
    turns = alpaca_read.train[0].turns
    assert [(t.role, t.text) for t in turns] == [("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello"),
                                                 ("user", "<image>Colour?\nBe brief."), ("assistant", "red")]


# --- bad rows: each its own error, before any model loads, nothing written ----------------------------------------
BAD_LLAVA = [
    ({"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},
     "unknown role 'robot'"),
    ({"id": "b", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "Hi"}]},
     "conversations[0]: expected a user turn first, got 'assistant'"),
    ({"id": "c", "image": "images/red-0.png", "conversations": [{"from": "human", "value": "<image><image>Hi"},
                                                                {"from": "gpt", "value": "x"}]},
     "2 <image> placeholder(s) but 1 image(s)"),
    ({"id": "d", "image": "images/nope.png", "conversations": [{"from": "human", "value": "<image>Hi"},
                                                               {"from": "gpt", "value": "x"}]},
     "'nope.png' not found under"),
    ({"id": "d2", "image": "images\\red-0.png", "conversations": [{"from": "human", "value": "<image>Hi"},
                                                                  {"from": "gpt", "value": "x"}]},
     "'images\\\\red-0.png' not found under"),  # then: write paths with /
    ({"id": "e", "image": "../outside.png", "conversations": [{"from": "human", "value": "<image>Hi"},
                                                              {"from": "gpt", "value": "x"}]},
     "image path '../outside.png' escapes the image root"),
    ({"id": "e1", "image": "/elsewhere/coco/1.jpg", "conversations": [{"from": "human", "value": "<image>Hi"},
                                                                      {"from": "gpt", "value": "x"}]},
     "image path '/elsewhere/coco/1.jpg' escapes the image root"),  # the message says: set data.image_root
    ({"id": "f", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]},
     "conversations[1]: empty assistant turn"),
    ({"id": "g", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"},
                                   {"from": "human", "value": "And?"}]},
     "must end with an assistant turn"),
    ({"id": "h", "conversation": []}, "no 'conversations' key"),
    ({"id": "i", "conversations": [{"from": ["human"], "value": "Hi"}, {"from": "gpt", "value": "x"}]},
     "conversations[0].from: expected a role name, got ['human']; LLaVA-Instruct roles: human, gpt, system"),
    ({"id": "j", "image": "images/red-0.png", "conversations": [{"from": "human", "value": "Hi"},
                                                                {"from": "gpt", "value": "<image>x"}]},
     "conversations[1]: an <image> placeholder in an assistant turn"),
]


@pytest.mark.parametrize("record, message", BAD_LLAVA, ids=[r["id"] for r, _ in BAD_LLAVA])
def test_each_bad_row_names_its_problem_and_row(colors, tmp_path, record, message):
    root, rows = colors
    good = json.loads(write_llava(tmp_path, rows[:6]).read_text())
    shutil.copytree(root / "images", tmp_path / "images")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(good[:3] + [record] + good[3:]))
    error = bad_row_error("llava", path)
    assert "1 bad row in" in error and "row 3: " in error and message in error, error
    if "\\" in message:
        assert "; it is written with backslashes: write paths with / (images/cat.png)" in error, error
    if "escapes the image root" in message:
        assert "; set data.image_root to a folder that holds the images" in error, error


def test_bad_rows_reported_together_and_nothing_written(colors, tmp_path):
    root, rows = colors
    shutil.copytree(root / "images", tmp_path / "images")
    good = json.loads(write_llava(tmp_path, rows[:8]).read_text())
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(good + [r for r, _ in BAD_LLAVA[:4]]))
    recipe = {"backbone": {"id": "mmpeft-demo/tiny-llava"}, "method": "lora", "train": {"objective": "generative"},
              "data": {"source": "llava", "path": str(path)}, "output": {"dir": str(tmp_path / "runs")}}
    with pytest.raises(DataError) as caught:
        mmpeft.run(recipe)
    assert "4 bad rows" in str(caught.value)
    assert all(f"row {i}:" in str(caught.value) for i in range(8, 12))
    assert not (tmp_path / "runs").exists()  # checked before a run folder (or a model) exists
    skipped = load_conversations(spec("llava", path, on_bad_rows="skip"), seed=0)
    assert skipped.info["skipped"] == 4 and sum(skipped.info["counts"].values()) == 8


def test_jsonl_lines_and_messages_parts_are_checked(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "video"}]},
                                 {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]}),
    ]) + "\n")
    error = bad_row_error("messages", path)
    assert "3 bad rows" in error and "line 2: not valid JSON" in error
    assert "line 3: messages[0].content[0]: expected {'type': 'image'}" in error
    assert "line 4: messages[1]: role 'tool' (tool results) is not supported" in error


def test_messages_with_images_inside_their_parts_or_tool_calls_name_the_fix(tmp_path):
    user = {"role": "user", "content": [{"type": "image", "image": "images/a.png"}, {"type": "text", "text": "C?"}]}
    answer = {"role": "assistant", "content": "red"}
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [
        {"messages": [user, answer]},  # Qwen's inline image, no images column: it would be silently dropped
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}, answer]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "function", "content": "{}"}, answer]},
    ]) + "\n")
    error = bad_row_error("messages", path)
    assert "line 1: messages[0].content[0]: the image named inside the part ('images/a.png') is not read; list the " \
           "row's image paths in 'images' and write the part as {'type': 'image'}" in error, error
    assert "line 2: messages[0].content[0]: an image_url part ({'url': 'a.png'}) is not read" in error, error
    assert "line 3: messages[1]: role 'function' (tool calls) is not supported yet" in error, error


def test_conversation_files_that_are_not_utf8_or_name_a_bad_file_are_named_errors(tmp_path):
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes(json.dumps([{"conversations": []}]).encode("utf-16"))
    assert bad_row_error("llava", utf16).startswith(f"{utf16}: line 1 is not UTF-8 text (byte 0xff at column 1")
    (tmp_path / "d.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"},
                                                                    {"from": "gpt", "value": "x"}]}] * 4))
    info = tmp_path / "dataset_info.json"
    entries = {"ok": {"file_name": "d.json", "formatting": "sharegpt"},
               "number": {"file_name": 5, "formatting": "sharegpt"},
               "missing": {"file_name": "nope.json", "formatting": "sharegpt"}}
    info.write_bytes(b"\xef\xbb\xbf" + json.dumps(entries).encode())  # Notepad's byte-order mark is fine
    assert sum(load_conversations(spec("llamafactory", info, name="ok"), seed=0).info["counts"].values()) == 4
    assert "file_name: expected the data file's path, got 5" in bad_row_error("llamafactory", info, name="number")
    assert bad_row_error("llamafactory", info, name="missing") == (
        f"1 problem(s) in {info} entry 'missing': file_name: 'nope.json' does not exist (looked for "
        f"{tmp_path / 'nope.json'}; it is relative to the folder of dataset_info.json)")
    (tmp_path / "parts").mkdir()  # LLaMA-Factory reads every file of a folder: named, not "not a save_to_disk folder"
    info.write_text(json.dumps({"folder": {"file_name": "parts", "formatting": "sharegpt"}}))
    assert "file_name: 'parts' is a folder of files" in bad_row_error("llamafactory", info, name="folder")
    assert bad_row_error("llamafactory", tmp_path, name="ok") == (  # was: "cannot write ...: Is a directory"
        f"data.path: {tmp_path} is a folder; data.source: llamafactory reads a dataset_info.json file: give {info}")


def test_a_conversation_that_opens_with_its_system_prompt_keeps_it_over_the_system_column(tmp_path):
    """As LLaMA-Factory reads ShareGPT: a first turn with the system tag is the prompt, the `system` column is then
    not used (was: both, so every such row was refused as "expected a user turn first, got 'system'")."""
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}]
    (tmp_path / "s.json").write_text(json.dumps([{"conversations": turns, "system": "Other."}] * 4))
    read = load_conversations(spec("sharegpt", tmp_path / "s.json", split=SplitSpec(val=0, test=0.5)), seed=0)
    assert [(t.role, t.text) for t in read.train[0].turns] == [("system", "Be brief."), ("user", "Hi"),
                                                               ("assistant", "x")]


def test_a_system_prompt_or_alpaca_input_that_is_not_text_is_a_bad_row(tmp_path):
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}]
    (tmp_path / "s.json").write_text(json.dumps([{"conversations": turns, "system": ["Be brief."]}] * 4))
    assert "row 0: 'system': expected the system prompt as a string, got list" in bad_row_error(
        "sharegpt", tmp_path / "s.json")  # was: trained without it, silently
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Sum?", "input": 3, "output": "3"}] * 4))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}}))
    assert "row 0: 'input': expected a string, got int" in bad_row_error(
        "llamafactory", tmp_path / "dataset_info.json", name="a")


def test_dataset_info_entry_problems_all_at_once(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    info = {"mine": {"file_name": "d.json", "formating": "sharegpt", "columns": {"mesages": "conversations"},
                     "tags": {"role_tag": "from", "user": "human"}},
            "remote": {"hf_hub_url": "someone/data"},
            "sampled": {"file_name": "d.json", "formatting": "sharegpt", "num_samples": 2}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    error = bad_row_error("llamafactory", tmp_path / "dataset_info.json", name="mine")
    assert "3 problem(s)" in error and "unknown key 'formating' (did you mean 'formatting'?)" in error
    assert "columns: unknown key 'mesages' (did you mean 'messages'?)" in error and "tags: unknown key 'user'" in error
    assert "cannot be read offline" in bad_row_error("llamafactory", tmp_path / "dataset_info.json", name="remote")
    assert "no entry 'mien'" in bad_row_error("llamafactory", tmp_path / "dataset_info.json", name="mien")
    assert "num_samples: 2 (LLaMA-Factory's random sample of the rows) is not applied; remove it" in bad_row_error(
        "llamafactory", tmp_path / "dataset_info.json", name="sampled")  # not silently every row


def test_recipe_refuses_keys_that_cannot_apply(colors):
    root, rows = colors
    path = str(write_llava(root, rows))
    with pytest.raises(RecipeError) as caught:
        load_recipe({"method": "lora", "data": {"source": "llava", "path": path, "shots": 4, "shift": ["rot90"]}})
    text = str(caught.value)
    assert "data.shots: conversations have no labels" in text and "data.shift" in text
    assert "train.objective: conversations train with 'generative'" in text
    with pytest.raises(RecipeError, match="data.name: required for data.source: llamafactory"):
        load_recipe({"method": "lora", "train": {"objective": "generative"},
                     "data": {"source": "llamafactory", "path": path}})
    with pytest.raises(DataError, match="holds conversations"):
        load_data(spec("llava", Path(path)), seed=0)
    with pytest.raises(RecipeError) as caught:  # were read by nothing, silently
        load_recipe({"method": "lora", "train": {"objective": "generative"},
                     "data": {"source": "messages", "path": path, "image_column": "pictures", "text_column": "answer",
                              "templates": ["a {label}"]}})
    text = str(caught.value)
    assert "data.image_column: conversation rows keep their images where their format does" in text
    assert "data.text_column: applies to labelled and caption data, not conversations" in text
    assert "data.templates: applies to labelled" in text


# --- assistant-only labels through each model's own chat template -------------------------------------------------
@pytest.mark.parametrize("kind", END_OF_TURN)
def test_labels_cover_every_assistant_turn_only(backbones, colors, kind):
    from mmpeft.data import load_image

    backbone = backbones[kind]
    root, rows = colors
    turns, images = rows[2]  # two images, two assistant turns
    from mmpeft.data.conversations import Turn

    messages = chat_messages([Turn("system", "You name colours.")] * (kind == "qwen2vl")
                             + [Turn(role, text) for role, text in turns])
    pictures = [load_image(str(root / image)) for image in images]
    encoded = backbone.encode_conversation(messages, pictures)
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    learned = backbone.tokenizer.decode(ids[labels != IGNORE_INDEX]).replace(" ", "")
    eos = END_OF_TURN[kind]
    assert learned == f"{turns[1][1]}{eos}{turns[3][1]}{eos}"  # both answers, each with its end of turn
    image_token = backbone.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[kind])
    assert (ids == image_token).sum() > 0 and not (labels == image_token).any()
    # the images keep their order: the first image's pixels come first
    alone = backbone.encode_one(backbone.render(chat_messages([Turn("user", "<image>")])), pictures[:1])
    first = alone["pixel_values"]
    assert torch.equal(encoded["pixel_values"][:len(first)], first)
    assert not torch.equal(encoded["pixel_values"][len(first):2 * len(first)], first)


@pytest.mark.parametrize("kind", END_OF_TURN)
def test_text_only_rows_batch_with_image_rows(backbones, colors, kind):
    from mmpeft.data import load_image
    from mmpeft.data.conversations import Turn

    backbone = backbones[kind]
    root, rows = colors
    (with_image, images), (text_only, _) = rows[0], rows[3]
    batch = backbone.encode_conversations([
        (chat_messages([Turn(r, t) for r, t in with_image]), [load_image(str(root / p)) for p in images]),
        (chat_messages([Turn(r, t) for r, t in text_only]), [])])
    labels = batch["labels"]
    learned = [backbone.tokenizer.decode(row[row != IGNORE_INDEX]).replace(" ", "") for row in batch["input_ids"]
               .where(labels != IGNORE_INDEX, IGNORE_INDEX)]
    assert learned == [f"{with_image[1][1]}{END_OF_TURN[kind]}square{END_OF_TURN[kind]}", f"red{END_OF_TURN[kind]}"]
    alone = backbone.encode_conversation(chat_messages([Turn(r, t) for r, t in with_image]),
                                         [load_image(str(root / p)) for p in images])
    assert torch.equal(batch["pixel_values"], alone["pixel_values"])  # only the image row's pixels
    assert torch.isfinite(backbone.model(**batch).loss)


# --- training and evaluation -----------------------------------------------------------------------------------
def test_lora_on_multi_turn_conversations_lowers_held_out_assistant_loss(tmp_path):
    path = write_llava(tmp_path, conversations(write_images(tmp_path), rows=36))
    metrics = mmpeft.run({
        "name": "conversations", "backbone": {"id": "mmpeft-demo/tiny-llava"},
        "data": {"source": "llava", "path": str(path), "split": {"val": 0.15, "test": 0.25}},
        "method": {"name": "lora", "r": 8, "alpha": 16, "towers": ["language", "projector"]},
        "train": {"objective": "generative", "epochs": 4, "batch_size": 8, "lr": 0.01},
        "eval": {"generate": True, "max_new_tokens": 4}, "output": {"dir": str(tmp_path / "runs"), "name": "run"}})
    before, after = metrics["zero_shot"], metrics["test"]
    assert after["tokens"] == before["tokens"] > 0 and after["n"] == 9
    assert after["loss"] < 0.5 * before["loss"], (before["loss"], after["loss"])
    assert after["answers"]["exact_match"] > before["answers"]["exact_match"]
    history = metrics["train"]["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    folder = tmp_path / "runs" / "run"
    assert json.loads((folder / "metrics.json").read_text())["test"]["loss"] == pytest.approx(after["loss"])
    report = (folder / "report.md").read_text()
    assert (folder / "adapter").is_dir() and "assistant-token loss" in report and "token-F1" in report
    assert 0 <= after["answers"]["token_f1"] <= 1 and after["answers"]["token_f1"] >= after["answers"]["exact_match"]
    samples = [line for line in report.splitlines() if line.startswith("| ![row") or line.startswith("| (text")]
    first = after["answers"]["examples"][0]
    assert len(samples) == len(after["answers"]["examples"]) and first["reference"] in samples[0]
    assert before["answers"]["examples"][0]["prediction"] in samples[0] and first["question"] in samples[0]
    thumbnails = sorted((folder / "samples").glob("*.png"))
    assert thumbnails and all(max(Image.open(p).size) <= 96 for p in thumbnails)


SHIPPED = ["llava-instruct.yaml", "llamafactory-sharegpt.yaml", "messages-jsonl.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_conversation_recipes_run_offline(name, tmp_path, monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)
    metrics = mmpeft.run(PROJECT_ROOT / "recipes" / name,
                         ["train.epochs=1", "eval.generate=false", f"output.dir={tmp_path}"])
    assert metrics["test"]["loss"] < metrics["zero_shot"]["loss"]


def test_mmpeft_check_reads_every_row(tmp_path, capsys, monkeypatch):
    from mmpeft.cli import main

    monkeypatch.chdir(PROJECT_ROOT)
    assert main(["check", "recipes/messages-jsonl.yaml"]) == 0
    assert "# data: train 14, val 4, test 6 rows (42 assistant turns, 24 images)" in capsys.readouterr().out
    lines = (PROJECT_ROOT / "recipes/data/conversations/messages.jsonl").read_text().splitlines()
    shutil.copytree(PROJECT_ROOT / "recipes/data/conversations/images", tmp_path / "images")
    (tmp_path / "m.jsonl").write_text("\n".join(lines[:5] + [lines[5].replace('"assistant"', '"asistant"')]))
    assert main(["check", "recipes/messages-jsonl.yaml", f"data.path={tmp_path / 'm.jsonl'}"]) != 0
    assert "line 6: messages[1]: unknown role 'asistant' (did you mean 'assistant'?)" in capsys.readouterr().err


def test_an_image_linked_from_outside_the_image_root_is_a_bad_row(tmp_path):
    """As for labelled rows: a symbolic link inside the image root that leads out of it is never opened."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_images(outside)
    root = tmp_path / "data"
    root.mkdir()
    (root / "linked").symlink_to(outside / "images", target_is_directory=True)
    image = sorted((outside / "images").rglob("*.png"))[0].relative_to(outside / "images")
    rows = [([("user", "<image>\nWhat colour?"), ("assistant", "red")], [f"linked/{image}"])] * 4
    message = bad_row_error("llava", write_llava(root, rows))
    assert "leads through a symbolic link to" in message and "outside the image root" in message


def test_the_readme_your_data_examples_read_as_written(tmp_path):
    """README "Your data": each file shown there, written as shown, reads with the recipe keys of its table row."""
    from mmpeft.data import read_rows

    text = (PROJECT_ROOT / "README.md").read_text().split("What each file looks like", 1)[1].split("```")[1]
    lines = [line for line in text.splitlines() if line.strip()]
    shown: dict[str, list[str]] = {}  # file -> its example lines
    for line in lines:
        if line.startswith("  "):
            shown[next(reversed(shown))].append(line.strip())
        else:
            shown[line.split()[0].rstrip(",:")] = []
    for image in ("images/coco/1.jpg", "images/a.png", "data/images/a.png", "images/0001.jpg"):
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 8), (200, 20, 20)).save(tmp_path / image)
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data/dataset_info.json").write_text(shown["data/dataset_info.json"][0])
    rows = {"llava.json": json.loads(shown["llava.json"][0]),
            "data/mine.json": json.loads(shown["data/dataset_info.json"][1])}
    for name, row in rows.items():
        (tmp_path / name).write_text(json.dumps(row * 4))
    (tmp_path / "train.jsonl").write_text((shown["train.jsonl"][0] + "\n") * 4)
    split = {"split": {"val": 0.0, "test": 0.5}}
    for source, path, keys in (("llava", "llava.json", {"image_root": str(tmp_path / "images")}),
                               ("llamafactory", "data/dataset_info.json", {"name": "mine"}),
                               ("messages", "train.jsonl", {})):
        data = load_recipe({"method": "lora", "train": {"objective": "generative"},
                            "data": {"source": source, "path": str(tmp_path / path), **keys, **split}}).data
        assert load_conversations(data, seed=0).info["images"]["total"] == 4, source
    table = "\n".join("\t".join(line.split(maxsplit=1)) for line in shown["train.tsv"]) + "\n"  # tab-separated
    (tmp_path / "train.tsv").write_text(table)
    raw = read_rows(load_recipe({"method": "lora", "train": {"objective": "contrastive"},
                                 "data": {"source": "captions", "path": str(tmp_path / "train.tsv")}}).data)
    assert [row.text for row in raw.rows] == ["a dog running on the beach"] and not raw.labelled
