"""Conversation datasets written exactly as their tools lay them out (LLaVA-Instruct JSON, LLaMA-Factory ShareGPT with
dataset_info.json, OpenAI/TRL messages as JSONL and as a saved `datasets` table), from one learnable content.

Content: noisy solid-colour images; single-image rows ask the colour then the shape (two assistant turns),
two-image rows ask the colour of the first then of the second image (order matters), text-only rows answer "red".
Also used once to write the shipped example data under recipes/data/conversations/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}
NAMES = list(COLORS)


def write_images(root: Path, per_color: int = 4, seed: int = 0) -> dict[str, list[str]]:
    """Small PNGs under root/images; color -> paths relative to root."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[str]] = {}
    for name, rgb in COLORS.items():
        for i in range(per_color):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
            relative = f"images/{name}-{i}.png"
            Image.fromarray(pixels).save(root / relative)
            paths.setdefault(name, []).append(relative)
    return paths


def conversations(paths: dict[str, list[str]], rows: int = 24) -> list[tuple[list[tuple[str, str]], list[str]]]:
    """[(turns [(role, text with <image>)], image paths)]: single-image, two-image and text-only rows."""
    out = []
    for i in range(rows):
        first, second = NAMES[i % 3], NAMES[(i // 3 + 1) % 3]
        image_a, image_b = paths[first][i % len(paths[first])], paths[second][(i + 1) % len(paths[second])]
        if i % 4 == 3:
            out.append(([("user", "Name a colour."), ("assistant", "red")], []))
        elif i % 4 == 2:
            out.append(([("user", "<image>\n<image>\nWhat colour is the first image?"), ("assistant", first),
                         ("user", "What colour is the second image?"), ("assistant", second)], [image_a, image_b]))
        else:
            out.append(([("user", "<image>\nWhat colour is this image?"), ("assistant", first),
                         ("user", "Which shape is it?"), ("assistant", "square")], [image_a]))
    return out


def write_llava(root: Path, rows: list) -> Path:
    """LLaVA-Instruct: a JSON list of {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}."""
    records = []
    for i, (turns, images) in enumerate(rows):
        record: dict = {"id": f"{i:06d}"}
        if images:
            record["image"] = images[0] if len(images) == 1 else images
        record["conversations"] = [{"from": "human" if role == "user" else "gpt", "value": text}
                                   for role, text in turns]
        records.append(record)
    path = root / "llava-instruct.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def write_llamafactory(root: Path, rows: list, system: str | None = "You name colours.") -> Path:
    """LLaMA-Factory sharegpt: {"conversations": [{"from", "value"}], "system", "images"} + its dataset_info.json."""
    records = []
    for turns, images in rows:
        record: dict = {"conversations": [{"from": "human" if role == "user" else "gpt", "value": text}
                                          for role, text in turns]}
        if system:
            record["system"] = system
        record["images"] = images
        records.append(record)
    (root / "colors_sharegpt.json").write_text(json.dumps(records, indent=1))
    entry = {"file_name": "colors_sharegpt.json", "formatting": "sharegpt",
             "columns": {"messages": "conversations", "system": "system", "images": "images"}}
    info = root / "dataset_info.json"
    info.write_text(json.dumps({"colors": entry}, indent=2))
    return info


def message_parts(text: str) -> list[dict]:
    """"<image>\\nWhat ..." -> TRL's content parts [{"type": "image"}, {"type": "text", "text": "What ..."}]."""
    parts: list[dict] = []
    for i, piece in enumerate(text.split("<image>")):
        if i:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def write_messages_jsonl(root: Path, rows: list, parts: bool = True) -> Path:
    """OpenAI/TRL messages, one JSON object per line: {"messages": [{"role", "content"}], "images": [...]}."""
    lines = []
    for turns, images in rows:
        messages = [{"role": role, "content": message_parts(text) if parts else text} for role, text in turns]
        lines.append(json.dumps({"messages": messages, "images": images}))
    path = root / "messages.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_messages_dataset(root: Path, rows: list) -> Path:
    """TRL's vision dataset layout: `messages` with content parts and an `images` list of Image features, saved."""
    import datasets

    table = {"messages": [[{"role": role, "content": message_parts(text)} for role, text in turns]
                          for turns, _ in rows],
             "images": [[str(root / image) for image in images] for _, images in rows]}
    features = datasets.Features({"messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
        {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
        "images": datasets.List(datasets.Image())})
    dataset = datasets.Dataset.from_dict(table, features=features)
    path = root / "messages-hf"
    dataset.save_to_disk(str(path))
    return path
