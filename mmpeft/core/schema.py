"""Strict dataclass loading: unknown keys, wrong types and bad choices become one error listing every problem."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

MAX_SHOWN = 80  # characters of a value an error message quotes: a huge value (an alias bomb) never floods a terminal


class RecipeError(ValueError):
    """Every problem found in a recipe, each prefixed by its YAML path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"invalid recipe {source}" if source else "invalid recipe"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric recipe field, written on the field itself: `epochs: Annotated[int, Range(ge=1)] = 5`.

    `build` checks them (on every item of a tuple field) and reports a violation like any other recipe error."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        parts = [f"{op} {_number(bound)}" for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le),
                                                             ("<", self.lt)) if bound is not None]
        return " and ".join(parts)


def show(value: Any) -> str:
    """A value's repr for an error message, cut to MAX_SHOWN characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text)} characters)"


def did_you_mean(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name[:MAX_SHOWN], list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, appending problems instead of raising."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping, got {type(data).__name__} {show(data)}")
        return None
    hints = get_type_hints(cls)
    bounds = {name: _range_of(hint) for name, hint in get_type_hints(cls, include_extras=True).items()}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            problems.append(f"{_join(path, str(key)[:MAX_SHOWN])}: unknown key{did_you_mean(str(key), fields)}; "
                            f"valid keys: {', '.join(fields)}")
    kwargs, out_of_range = {}, False
    for name, field in fields.items():
        where = _join(path, name)
        if name in data:
            kwargs[name] = convert(hints[name], data[name], where, problems)
            if bounds.get(name) is not None:
                out_of_range |= check_range(bounds[name], kwargs[name], where, problems)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            problems.append(f"{where}: required field is missing")
    if out_of_range:  # cross-field checks would only repeat the problem in other words
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:  # __post_init__ cross-field checks
        message = str(error)
        problems.append(message if path and message.startswith(path + ".") else f"{path or '<root>'}: {message}")
        return None


def check_range(bounds: Range, value: Any, path: str, problems: list[str]) -> bool:
    """Append a problem for a number (or each number of a tuple) outside `bounds`; None and non-numbers pass.
    Returns whether any was out of range."""
    items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
    found = False
    for i, item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool) and not bounds.admits(item):
            where = path if i is None else f"{path}[{i}]"
            problems.append(f"{where}: {_number(item)} is out of range; it must be {bounds.describe()}")
            found = True
    return found


def _range_of(hint: Any) -> Range | None:
    """The Range in an `Annotated[...]` hint, also inside `X | None` or `tuple[...]`."""
    if get_origin(hint) is Annotated:
        return next((a for a in hint.__metadata__ if isinstance(a, Range)), None)
    for arg in get_args(hint):
        found = _range_of(arg)
        if found is not None:
            return found
    return None


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def convert(hint: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(hint, value, path, problems)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            problems.append(f"{path}: {show(value)} is not one of {', '.join(map(repr, choices))}"
                            f"{did_you_mean(str(value), map(str, choices))}")
        return value
    if origin in (list, tuple, dict):
        return _convert_collection(hint, value, path, problems)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path, problems)
    return _convert_scalar(hint, value, path, problems)


def _convert_union(hint: Any, value: Any, path: str, problems: list[str]) -> Any:
    """The first option that takes the value without a problem; one option left: its own problems."""
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
    problems.append(f"{path}: expected {_describe(hint)}, got {show(value)}")
    return None


def _convert_collection(hint: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Lists and tuples (a single value becomes a list of one) -> tuples; mappings -> dicts, item by item."""
    if get_origin(hint) is dict:
        key_hint, value_hint = get_args(hint) or (Any, Any)
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {show(value)}")
            return None
        return {convert(key_hint, k, path, problems): convert(value_hint, v, _join(path, str(k)), problems)
                for k, v in value.items()}
    (item_hint, *_) = get_args(hint) or (Any,)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        problems.append(f"{path}: expected a list, got {show(value)}")
        return None
    return tuple(convert(item_hint, v, f"{path}[{i}]", problems) for i, v in enumerate(value))


def _convert_scalar(hint: Any, value: Any, path: str, problems: list[str]) -> Any:
    """bool, float (a numeric string is read as a number; never NaN or infinite), int and str, strictly."""
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {show(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {show(value)}")
            return None
        if not math.isfinite(value):
            problems.append(f"{path}: expected a finite number, got {value}")
            return None
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{path}: expected an integer, got {show(value)}")
        return None
    if hint is str and not isinstance(value, str):
        problems.append(f"{path}: expected a string, got {show(value)}")
        return None
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
