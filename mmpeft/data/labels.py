"""The label set: class order, display names and the prompt texts a dual encoder scores images against.

Class order is fixed here once (natural sort of the raw labels, or `data.classes` as written) so label ints mean
the same thing in every run, split and checkpoint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence

from mmpeft.core.schema import did_you_mean
from mmpeft.data.errors import DataError
from mmpeft.specs import DataSpec

logger = logging.getLogger("mmpeft")


def natural_key(text: str) -> tuple:
    """"class2" sorts before "class10"; digit runs compare as numbers."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


class LabelSet:
    """Ordered class keys (raw label strings) with their display names and per-class prompt texts."""

    def __init__(self, keys: Sequence[str], names: Mapping[str, str] | None = None,
                 prompts: Mapping[str, Sequence[str]] | None = None,
                 templates: Sequence[str] = ("a photo of a {label}.",)):
        self.keys: list[str] = list(keys)
        if len(set(self.keys)) != len(self.keys):
            duplicates = sorted({k for k in self.keys if self.keys.count(k) > 1})
            raise DataError(f"data.classes: duplicate classes {duplicates}")
        self._position = {key: i for i, key in enumerate(self.keys)}
        names = dict(names or {})
        self._names = [str(names.get(key, key)) for key in self.keys]
        prompts = dict(prompts or {})
        self._prompts: list[list[str]] = []
        for key, name in zip(self.keys, self._names):
            texts = list(prompts.get(key) or [t.format(label=name) for t in templates])
            self._prompts.append(texts)

    def to_dict(self) -> dict:
        """Keys, names and prompts as a run folder (labels.json) and an export manifest record them."""
        return {"keys": self.keys, "names": self.names, "prompts": [self.prompts(i) for i in range(len(self))]}

    @classmethod
    def from_dict(cls, data: dict) -> LabelSet:
        """The label set `to_dict` recorded."""
        return cls(data["keys"], dict(zip(data["keys"], data["names"])), dict(zip(data["keys"], data["prompts"])))

    @classmethod
    def from_spec(cls, spec: DataSpec, raw_labels: Iterable[str], default_names: Mapping[str, str] | None = None,
                  *, where: str | None = None, min_classes: int = 1) -> "LabelSet":
        """`data.classes` order if given, else the raw labels naturally sorted; names and prompts from the spec.

        Fewer than `min_classes` classes is a DataError naming `where` (the source). `load_data` asks for 2 unless
        every row has its own text: a one-class classifier is always right, so its accuracy would mean nothing,
        while caption or answer data may carry one placeholder label.
        """
        keys = list(spec.classes) if spec.classes is not None else sorted(set(raw_labels), key=natural_key)
        if len(keys) < min_classes:
            raise DataError(_too_few_classes(keys, min_classes, spec, where))
        names = dict(default_names or {}) if spec.label_names is None else dict(spec.label_names)
        for field, given in (("label_names", spec.label_names), ("label_prompts", spec.label_prompts)):
            unknown = [k for k in (given or {}) if k not in keys]
            if unknown:  # may be meant for another task of a sequence, so not an error; but never silent
                hints = "".join(f"{k!r}{did_you_mean(k, keys)} " for k in unknown[:5])
                logger.warning("data.%s: %d key(s) are not classes of this data and are unused: %s",
                               field, len(unknown), hints.strip())
        return cls(keys, names, spec.label_prompts, spec.templates)

    def index(self, key: str) -> int:
        """The class int of raw label `key`; an unknown key is an error with a did-you-mean."""
        try:
            return self._position[key]
        except KeyError:
            raise DataError(f"label {key!r} is not in the label set{did_you_mean(key, self.keys)}; "
                            f"classes: {', '.join(self.keys)}") from None

    @property
    def names(self) -> list[str]:
        """Display names in class order (what prompts and reports show)."""
        return list(self._names)

    def prompts(self, i: int) -> list[str]:
        """The prompt texts of class `i` (several: average their embeddings)."""
        return list(self._prompts[i])

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._position

    def __repr__(self) -> str:
        return f"LabelSet({len(self)} classes: {', '.join(self.keys[:10])}{', ...' if len(self) > 10 else ''})"


def _too_few_classes(keys: Sequence[str], needed: int, spec: DataSpec, where: str | None) -> str:
    found = f"{len(keys)} class{'' if len(keys) == 1 else 'es'}" + (f" ({', '.join(map(repr, keys))})" if keys else "")
    place = f"{where or spec.path or spec.source} (data.source: {spec.source})"
    origin = f"in data.classes for {place}" if spec.classes is not None else f"found in {place}"
    return (f"{found} {origin}: classification needs at least {needed}. Add images of other classes, or give every "
            f"row its own caption (data.text_column: {spec.text_column!r}) for caption data")
