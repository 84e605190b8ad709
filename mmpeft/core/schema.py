"""Strict dataclass loading: unknown keys, wrong types and bad choices become one error listing every problem."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class RecipeError(ValueError):
    """Every problem found in a recipe, each prefixed by its YAML path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"invalid recipe {source}" if source else "invalid recipe"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))


def did_you_mean(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, appending problems instead of raising."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping, got {type(data).__name__} {data!r}")
        return None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            problems.append(f"{_join(path, str(key))}: unknown key{did_you_mean(str(key), fields)}; "
                            f"valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        where = _join(path, name)
        if name in data:
            kwargs[name] = convert(hints[name], data[name], where, problems)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            problems.append(f"{where}: required field is missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:  # __post_init__ cross-field checks
        message = str(error)
        problems.append(message if path and message.startswith(path + ".") else f"{path or '<root>'}: {message}")
        return None


def convert(hint: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        non_none = [o for o in options if o is not type(None)]
        for option in non_none:
            trial: list[str] = []
            result = convert(option, value, path, trial)
            if not trial:
                return result
        if len(non_none) == 1:
            return convert(non_none[0], value, path, problems)
        problems.append(f"{path}: expected {_describe(hint)}, got {value!r}")
        return None
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            problems.append(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}"
                            f"{did_you_mean(str(value), map(str, choices))}")
        return value
    if origin in (list, tuple):
        (item_hint, *_) = get_args(hint) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}")
            return None
        items = [convert(item_hint, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict:
        key_hint, value_hint = get_args(hint) or (Any, Any)
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return None
        return {convert(key_hint, k, path, problems): convert(value_hint, v, _join(path, str(k)), problems)
                for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path, problems)
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            problems.append(f"{path}: expected a number, got {value!r}")
            return None
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
            return None
        return value
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
            return None
        return value
    return value


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples -> plain dicts/lists for YAML and JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(hint: Any) -> str:
    args = [a for a in get_args(hint) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args)
