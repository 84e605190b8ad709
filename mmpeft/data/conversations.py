"""Conversations (multi-turn, multi-image) as LLaVA, ShareGPT/LLaMA-Factory and OpenAI-style tools write them.

Every format is read into one form: turns of role `system`/`user`/`assistant` whose text marks each image with an
`<image>` placeholder, plus the row's images in order. Everything a user can get wrong is checked here, for every
row, before any model loads: roles, turn order, placeholders vs images, image files, empty answers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mmpeft.core.schema import did_you_mean
from mmpeft.data.sources import DatasetImage, ImageRef
from mmpeft.data.validate import BadRow, backslash_hint, check_image

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    text: str  # images marked by IMAGE_PLACEHOLDER, in order
    where: str = ""  # where the row keeps it ("conversations[2]", "system"), for messages


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    images: tuple[ImageRef, ...]
    source: str  # "row 3" / "line 4": where the user finds it
    problems: tuple[str, ...] = ()  # what the reader already found wrong (bad JSON, missing keys, ...)


@dataclass(frozen=True)
class ConversationFormat:
    """Where one tool keeps the parts of a row: keys, role names, and how content is written."""

    tool: str  # named in messages ("LLaVA", "ShareGPT", ...)
    messages_keys: tuple[str, ...]  # the first present one is used
    role_keys: tuple[str, ...]
    content_keys: tuple[str, ...]
    roles: dict[str, str]  # the tool's role name -> system/user/assistant
    images_key: str | None = "images"
    system_key: str | None = None  # a row-level system prompt (ShareGPT's `system` column)
    unsupported_roles: dict[str, str] = field(default_factory=dict)  # role -> why it is refused


TOOL_ROLES = {"observation": "tool results", "function_call": "tool calls", "tool": "tool results",
              "function": "tool calls"}
LLAVA = ConversationFormat("LLaVA-Instruct", ("conversations",), ("from",), ("value",),
                           {"human": "user", "gpt": "assistant", "system": "system"}, images_key="image")
SHAREGPT = ConversationFormat("ShareGPT", ("conversations", "messages"), ("from", "role"), ("value", "content"),
                              {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant",
                               "system": "system"}, system_key="system",
                              unsupported_roles={"observation": TOOL_ROLES["observation"],
                                                 "function_call": TOOL_ROLES["function_call"]})
MESSAGES = ConversationFormat("OpenAI messages", ("messages",), ("role",), ("content",),
                              {"system": "system", "user": "user", "assistant": "assistant"},
                              unsupported_roles={"tool": TOOL_ROLES["tool"], "function": TOOL_ROLES["function"]})


@dataclass(frozen=True, eq=False)
class DatasetImageAt(DatasetImage):
    """One image of a list-of-images column of a `datasets` table (TRL's `images`), read only when used."""

    position: int = 0

    def open(self):
        import io

        from PIL import Image

        value = self.dataset[self.index][self.column][self.position]
        return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])

    def __repr__(self) -> str:
        return f"DatasetImage(row {self.index}, column {self.column!r}, image {self.position})"


def parse_record(record: Any, source: str, fmt: ConversationFormat, images: list[ImageRef] | None) -> Conversation:
    """One row of `fmt` -> a Conversation; problems are collected, never raised, so every row gets reported.

    `images` are the row's images, already resolved by the file reader (None: the row has no image key).
    """
    if not isinstance(record, dict):
        return Conversation((), (), source, (f"expected a JSON object, got {type(record).__name__}",))
    key = next((k for k in fmt.messages_keys if k in record), None)
    if key is None:
        wanted = " or ".join(repr(k) for k in fmt.messages_keys)
        return Conversation((), tuple(images or ()), source,
                            (f"no {wanted} key ({fmt.tool} rows keep their turns there; keys: "
                             f"{', '.join(map(str, record)) or 'none'})",))
    messages = record[key]
    if not isinstance(messages, list) or not messages:
        return Conversation((), tuple(images or ()), source, (f"{key!r} must be a non-empty list of turns",))
    problems: list[str] = []
    turns = []
    for number, message in enumerate(messages):
        turn = _parse_turn(message, f"{key}[{number}]", fmt, problems)
        if turn is not None:
            turns.append(turn)
    system = record.get(fmt.system_key) if fmt.system_key else None
    if turns and turns[0].role == "system" and turns[0].where == f"{key}[0]":
        pass  # the conversation opens with its system prompt: LLaMA-Factory then ignores the row's system column
    elif isinstance(system, str) and system.strip():
        turns.insert(0, Turn("system", system, fmt.system_key))
    elif system is not None and not isinstance(system, str):  # not silently trained without it
        problems.append(f"{fmt.system_key!r}: expected the system prompt as a string, got {type(system).__name__}")
    inline = None if images else _inline_image(messages, fmt.content_keys)
    if inline is not None:
        problems.append(f"{key}{inline[0]}: the image named inside the part ({inline[1]!r:.60}) is not read; list "
                        f"the row's image paths in {fmt.images_key or 'images'!r} and write the part as "
                        "{'type': 'image'}")
    return Conversation(tuple(turns), tuple(images or ()), source, tuple(problems))


def _parse_turn(message: Any, where: str, fmt: ConversationFormat, problems: list[str]) -> Turn | None:
    if not isinstance(message, dict):
        problems.append(f"{where}: expected an object with a role and content, got {type(message).__name__}")
        return None
    role_key = next((k for k in fmt.role_keys if k in message), None)
    content_key = next((k for k in fmt.content_keys if k in message), None)
    if role_key is None or content_key is None:
        missing = " / ".join(fmt.role_keys if role_key is None else fmt.content_keys)
        problems.append(f"{where}: no {missing!r} key (keys: {', '.join(map(str, message)) or 'none'})")
        return None
    raw_role = message[role_key]
    if not isinstance(raw_role, str):
        problems.append(f"{where}.{role_key}: expected a role name, got {raw_role!r:.40}; "
                        f"{fmt.tool} roles: {', '.join(fmt.roles)}")
        return None
    if raw_role in fmt.unsupported_roles:
        problems.append(f"{where}: role {raw_role!r} ({fmt.unsupported_roles[raw_role]}) is not supported yet; "
                        "only system, user and assistant turns train")
        return None
    if raw_role not in fmt.roles:
        valid = list(fmt.roles)
        problems.append(f"{where}: unknown role {raw_role!r}{did_you_mean(str(raw_role), valid)}; "
                        f"{fmt.tool} roles: {', '.join(valid)}")
        return None
    text = content_text(message[content_key], f"{where}.{content_key}", problems)
    return None if text is None else Turn(fmt.roles[raw_role], text, where)


def content_text(content: Any, where: str, problems: list[str]) -> str | None:
    """A string, or OpenAI-style parts ({"type": "image"} / {"type": "text", "text": ...}) -> placeholder text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        problems.append(f"{where}: expected a string or a list of parts, got {type(content).__name__}")
        return None
    pieces = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            problems.append(f"{where}[{i}]: an image_url part ({part.get('image_url')!r:.60}) is not read; list the "
                            "row's image paths in its 'images' and write the part as {'type': 'image'}")
            return None
        if kind == "image":
            pieces.append(IMAGE_PLACEHOLDER)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            problems.append(f"{where}[{i}]: expected {{'type': 'image'}} or {{'type': 'text', 'text': ...}}, "
                            f"got {part!r:.80}")
            return None
    return "".join(pieces)


def _inline_image(messages: list, content_keys: tuple[str, ...]) -> tuple[str, Any] | None:
    """(where, image) of the first image part naming its image itself (Qwen's "image", the chat templates'
    "url" / "path"), which mmpeft does not read: a row's images are its images column."""
    for number, message in enumerate(messages):
        key = next((k for k in content_keys if k in message), None) if isinstance(message, dict) else None
        content = message[key] if key else None
        for i, part in enumerate(content if isinstance(content, list) else ()):
            if isinstance(part, dict) and part.get("type") == "image":
                named = next((part[name] for name in ("image", "url", "path") if part.get(name) not in (None, "")),
                             None)
                if named is not None:
                    return f"[{number}].{key}[{i}]", named
    return None


def conversation_problems(conversation: Conversation) -> list[str]:
    """Everything wrong with one conversation as the model would see it (the reader's problems first)."""
    problems = list(conversation.problems)
    turns = conversation.turns
    if not turns or problems:  # a turn the reader could not read would make every later check misleading
        return problems
    problems += _order_problems(turns)
    for i, turn in enumerate(turns):
        where = turn.where or f"turn {i + 1}"
        if turn.role == "assistant" and not turn.text.strip():
            problems.append(f"{where}: empty assistant turn (nothing to learn)")
        if turn.role != "user" and IMAGE_PLACEHOLDER in turn.text:
            article = "an" if turn.role == "assistant" else "a"
            problems.append(f"{where}: an {IMAGE_PLACEHOLDER} placeholder in {article} {turn.role} turn; images go in "
                            "user turns")
    placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != len(conversation.images):
        problems.append(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(conversation.images)} "
                        "image(s); write one placeholder per image, in the order of the images")
    return problems


def _order_problems(turns: Sequence[Turn]) -> list[str]:
    """System first (optional), then user and assistant alternating, ending with an assistant turn."""
    roles = [turn.role for turn in turns]
    start = 1 if roles[0] == "system" else 0
    for i, role in enumerate(roles[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            position = "first" if i == start else f"after {roles[i - 1]!r}"
            article = "an" if expected == "assistant" else "a"
            return [f"{turns[i].where or f'turn {i + 1}'}: expected {article} {expected} turn {position}, got {role!r} "
                    "(turns must be: optional system, then user and assistant alternating)"]
    if len(roles) == start or roles[-1] != "assistant":
        return [f"the last turn is {roles[-1]!r}; a conversation must end with an assistant turn to learn from"]
    return []


def find_bad_conversations(conversations: Sequence[Conversation], max_pixels: int | None = None,
                           ) -> tuple[list[Conversation], list[BadRow]]:
    """Good conversations and one BadRow per bad one, naming all of its problems; each image is checked once
    (header size against `max_pixels` before decoding, then decoded as labelled rows' images are)."""
    checked: dict[object, str | None] = {}
    good, bad = [], []
    for conversation in conversations:
        problems = conversation_problems(conversation)
        kind = "read" if problems else None
        for position, image in enumerate(conversation.images):
            status = _image_status(image, checked, max_pixels)
            if status is not None:
                problems.append(f"image {position + 1}: {status}")
                kind = kind or ("missing" if "not found" in status else "large" if "too large" in status
                                else "corrupt")
        if problems:
            bad.append(BadRow(conversation.source, kind or "read", "; ".join(problems)))
        else:
            good.append(conversation)
    return good, bad


def _image_status(image: ImageRef, checked: dict[object, str | None], max_pixels: int | None) -> str | None:
    key = image if isinstance(image, str) else id(image)
    if key not in checked:
        checked[key] = _check(image, max_pixels)
    return checked[key]


def _check(image: ImageRef, max_pixels: int | None) -> str | None:
    if isinstance(image, str):
        if not os.path.isfile(image):
            folder, name = os.path.split(image)
            return f"{name!r} not found under {folder}{backslash_hint(name)}"
        problem = check_image(lambda: Image.open(image), max_pixels)
    elif isinstance(image, DatasetImage):
        problem = check_image(image.open, max_pixels)
    else:
        return None
    if problem is None:
        return None
    kind, detail = problem
    return f"{image!r} is too large ({detail})" if kind == "large" else f"{image!r} is unreadable ({detail})"


def chat_messages(turns: Sequence[Turn]) -> list[dict]:
    """Turns -> chat-template messages: each placeholder becomes an image part where it stood, the text around it
    text parts (whitespace next to an image dropped: "<image>\\nWhat is it?" is an image, then "What is it?")."""
    messages = []
    for turn in turns:
        parts: list[dict] = []
        for i, piece in enumerate(turn.text.split(IMAGE_PLACEHOLDER)):
            if i:
                parts.append({"type": "image"})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        messages.append({"role": turn.role, "content": parts})
    return messages


def last_answer(turns: Sequence[Turn]) -> tuple[tuple[Turn, ...], str]:
    """(the turns up to the last assistant turn, that turn's text): what generation is asked for and scored on."""
    return tuple(turns[:-1]), turns[-1].text.strip()
