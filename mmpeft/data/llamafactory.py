"""LLaMA-Factory's `dataset_info.json`: one entry names a data file, its formatting, columns and role tags.

Reading the entry (`data.source: llamafactory`, `data.path: .../dataset_info.json`, `data.name: entry`) means a
LLaMA-Factory user changes nothing. Keys and defaults follow LLaMA-Factory's data/README.md; `sharegpt` and
`alpaca` formatting are read, images resolve against the folder of dataset_info.json (LLaMA-Factory's media_dir
default). Hub-hosted entries cannot be read offline and are refused with what to do instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpeft.core.schema import did_you_mean
from mmpeft.data.conversation_files import read_text
from mmpeft.data.conversations import TOOL_ROLES, Conversation, ConversationFormat, Turn, content_text
from mmpeft.data.errors import DataError

ENTRY_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name", "file_sha1",
              "subset", "folder", "ranking", "formatting", "split", "num_samples", "columns", "tags")
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios",
               "chosen", "rejected", "kto_tag")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
ALPACA_DEFAULTS = {"prompt": "instruction", "query": "input", "response": "output"}
UNSUPPORTED_COLUMNS = {"videos": "videos", "audios": "audio", "chosen": "preference pairs",
                       "rejected": "preference pairs", "kto_tag": "KTO labels", "tools": "tool descriptions"}


@dataclass(frozen=True)
class LlamaFactoryEntry:
    """One dataset_info.json entry, checked: the data file, how its rows are formatted, where images resolve."""

    name: str
    file: Path
    formatting: str  # sharegpt | alpaca
    columns: dict[str, str]
    tags: dict[str, str]
    split: str = "train"

    def sharegpt_format(self) -> ConversationFormat:
        tags = self.tags
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
        refused = {tags["observation_tag"]: TOOL_ROLES["observation"], tags["function_tag"]: TOOL_ROLES["function"]}
        messages = self.columns.get("messages", "conversations")
        return ConversationFormat(f"LLaMA-Factory entry {self.name!r}", (messages,), (tags["role_tag"],),
                                  (tags["content_tag"],), roles,
                                  images_key=self.columns.get("images"), system_key=self.columns.get("system"),
                                  unsupported_roles=refused)


def read_entry(info_path: Path, name: str | None) -> LlamaFactoryEntry:
    """The entry `name` of a dataset_info.json; every problem with it is reported in one DataError."""
    where = f"{info_path}"
    if info_path.is_dir():
        inside = info_path / "dataset_info.json"
        raise DataError(f"data.path: {where} is a folder; data.source: llamafactory reads a dataset_info.json file: "
                        + (f"give {inside}" if inside.is_file() else "give the path of one"))
    try:
        info = json.loads(read_text(info_path))
    except FileNotFoundError:
        raise DataError(f"data.path: {where} does not exist") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(info, dict) or not info:
        raise DataError(f"{where}: expected an object of dataset entries (name -> description)")
    if name is None:
        raise DataError(f"data.name: which entry of {where}? entries: {', '.join(info)}")
    if name not in info:
        raise DataError(f"data.name: no entry {name!r} in {where}{did_you_mean(name, list(info))}; "
                        f"entries: {', '.join(info)}")
    entry = info[name]
    if not isinstance(entry, dict):
        raise DataError(f"{where}: entry {name!r} must be an object, got {type(entry).__name__}")
    problems = _entry_problems(entry, f"{where} entry {name!r}")
    file_name = entry.get("file_name")
    if isinstance(file_name, str) and file_name.strip() and not (info_path.parent / file_name).exists():
        problems.append(f"file_name: {file_name!r} does not exist (looked for {info_path.parent / file_name}; it is "
                        "relative to the folder of dataset_info.json)")
    elif isinstance(file_name, str) and file_name.strip() and _plain_folder(info_path.parent / file_name):
        problems.append(f"file_name: {file_name!r} is a folder of files ({info_path.parent / file_name}), which "
                        "LLaMA-Factory reads file by file and mmpeft does not; name one JSON/JSONL file (or a "
                        "folder saved by datasets' save_to_disk)")
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {where} entry {name!r}: " + "; ".join(problems))
    formatting = entry.get("formatting", "alpaca")
    columns = dict(ALPACA_DEFAULTS) if formatting == "alpaca" else {"messages": "conversations"}
    columns.update(entry.get("columns") or {})
    tags = {**TAG_DEFAULTS, **(entry.get("tags") or {})}
    return LlamaFactoryEntry(name, info_path.parent / file_name, formatting, columns, tags,
                             entry.get("split", "train"))


def _plain_folder(path: Path) -> bool:
    """A folder that is not a `datasets` save_to_disk folder (those hold state.json or dataset_dict.json)."""
    return path.is_dir() and not any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def _entry_problems(entry: dict, where: str) -> list[str]:
    problems = [f"unknown key {key!r}{did_you_mean(key, list(ENTRY_KEYS))}; valid keys: {', '.join(ENTRY_KEYS)}"
                for key in entry if key not in ENTRY_KEYS]
    for section, valid in (("columns", COLUMN_KEYS), ("tags", TAG_KEYS)):
        value = entry.get(section) or {}
        if not isinstance(value, dict):
            problems.append(f"{section!r} must be an object, got {type(value).__name__}")
            continue
        problems += [f"{section}: unknown key {key!r}{did_you_mean(key, list(valid))}; valid: {', '.join(valid)}"
                     for key in value if key not in valid]
        problems += [f"{section}.{key}: expected a string, got {item!r}" for key, item in value.items()
                     if key in valid and not isinstance(item, str)]
    hub = [key for key in HUB_KEYS if key in entry]
    if hub and "file_name" not in entry:
        problems.append(f"{hub[0]} names a remote dataset, which cannot be read offline; download it and point "
                        "file_name at the local file")
    elif "file_name" not in entry:
        problems.append("no 'file_name': name the data file (relative to the folder of dataset_info.json)")
    elif not isinstance(entry["file_name"], str) or not entry["file_name"].strip():
        problems.append(f"file_name: expected the data file's path, got {entry['file_name']!r:.60}")
    if entry.get("formatting", "alpaca") not in ("alpaca", "sharegpt"):
        problems.append(f"formatting: {entry['formatting']!r} is not read; mmpeft reads alpaca and sharegpt")
    if entry.get("num_samples") is not None:
        problems.append(f"num_samples: {entry['num_samples']!r} (LLaMA-Factory's random sample of the rows) is not "
                        "applied; remove it to train on every row, or cut the file to the rows you want")
    if entry.get("ranking"):
        problems.append("ranking: true (preference data) is not supported; supervised conversations only")
    for column, what in UNSUPPORTED_COLUMNS.items():
        if column in (entry.get("columns") or {}):
            problems.append(f"columns.{column}: {what} are not supported yet; remove the column mapping")
    return problems


def alpaca_conversation(record: Any, source: str, images: list, entry: LlamaFactoryEntry) -> Conversation:
    """An alpaca row -> turns: system, the history pairs, then instruction (+ input) and output."""
    if not isinstance(record, dict):
        return Conversation((), (), source, (f"expected a JSON object, got {type(record).__name__}",))
    columns, problems = entry.columns, []
    turns: list[Turn] = []
    system = record.get(columns["system"]) if "system" in columns else None
    if isinstance(system, str) and system.strip():
        turns.append(Turn("system", system, columns["system"]))
    elif system is not None and not isinstance(system, str):
        problems.append(f"{columns['system']!r}: expected the system prompt as a string, got {type(system).__name__}")
    history = record.get(columns["history"]) if "history" in columns else None
    for i, pair in enumerate(history or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            problems.append(f"{columns['history']}[{i}]: expected [question, answer], got {pair!r:.60}")
            continue
        turns += [Turn("user", pair[0], f"{columns['history']}[{i}][0]"),
                  Turn("assistant", pair[1], f"{columns['history']}[{i}][1]")]
    prompt = content_text(record.get(columns["prompt"], ""), columns["prompt"], problems) or ""
    query = record.get(columns["query"]) or ""
    if not isinstance(query, str):
        problems.append(f"{columns['query']!r}: expected a string, got {type(query).__name__}")
        query = ""
    response = record.get(columns["response"])
    if not isinstance(response, str):
        problems.append(f"no {columns['response']!r} string (the answer to learn)")
        response = ""
    turns += [Turn("user", f"{prompt}\n{query}" if query else prompt, columns["prompt"]),
              Turn("assistant", response, columns["response"])]
    return Conversation(tuple(turns), tuple(images), source, tuple(problems))
