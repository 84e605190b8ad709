"""WebDataset tar shards (`train-{0000..0009}.tar`: `key.jpg`/`key.png`/`key.webp` + `key.txt`/`key.json` per
sample) as rows, through the `webdataset` package's own conventions (`pip install mmpeft[webdataset]`).

Why read in place: data that does not fit a folder of files should not be unpacked into one. Each shard's tar
headers are scanned once (no image is decoded); a sample's image stays a `ShardImage` (shard, offset, size) that
is read with one seek when the batch needs it, and its caption (and label, if any) is kept. Samples are grouped by
webdataset's key rule (`base_plus_ext`: the name up to the first dot in its last path part), and the pattern is
brace-expanded as webdataset expands it. Training order is the trainer's: a permutation by seed and epoch, so a
resumed run continues at the same position from its checkpoint.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

from mmpeft.data.errors import DataError
from mmpeft.data.sources import URL, Row, ShardImage
from mmpeft.specs import DataSpec

logger = logging.getLogger("mmpeft")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "json")


def expand_shards(pattern: str, remote: bool = False, needs: str = "data.source: webdataset") -> list[str]:
    """`train-{0000..0009}.tar` (webdataset's brace syntax) or a glob -> existing shard files, in order. With
    `remote` (streams), URLs and `pipe:` commands are taken as written: only reading them can check them."""
    try:
        import braceexpand  # noqa: F401
        import webdataset  # noqa: F401  (the optional extra that brings braceexpand)
    except ImportError:
        raise DataError(f"{needs} needs the webdataset package: pip install 'mmpeft[webdataset]'") from None

    def as_written(name: str) -> bool:
        return remote and is_remote(name)

    names = [name for part in expand_braces(pattern)
             for name in ([part] if as_written(part) else sorted(glob.glob(part)) or [part])]
    missing = [name for name in names if not as_written(name) and not Path(name).is_file()]
    if missing:
        raise DataError(f"{pattern!r}: {len(missing)} of {len(names)} shards do not exist (first: "
                        f"{missing[0]!r}){missing_hint(missing[0])}")
    return names


def is_remote(url: str) -> bool:
    """What webdataset opens besides local files: a URL, or a `pipe:` command."""
    return url[:5].lower() == "pipe:" or bool(URL.match(url))


def expand_braces(pattern: str) -> list[str]:
    """webdataset's brace expansion of a shard pattern; unbalanced braces are a DataError naming the pattern."""
    import braceexpand

    try:
        return list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError:
        raise DataError(f"{pattern!r}: unbalanced braces; a shard range is written like train-{{0000..0009}}.tar"
                        ) from None


def missing_hint(name: str) -> str:
    """Why a shard name that is not a file may be wrong: a folder, braces left unexpanded, a glob matching nothing."""
    if Path(name).is_dir():
        return f"; it is a folder: name its shards, e.g. {str(Path(name) / '*.tar')!r}"
    if "{" in name or "}" in name:
        return "; its braces did not expand: a shard range is written like train-{0000..0009}.tar"
    if any(char in name for char in "*?["):
        return "; the glob matches no file"
    return ""


def check_held_out_apart(spec: DataSpec, files: Callable[[str], list[str]]) -> None:
    """The held-out patterns (data.eval_path, data.val_path) share no file with data.path (`files` lists a
    pattern's files): a shared one would be trained on and scored as held out (a DataError). Validation files that
    are test files are only warned about: the best epoch is then picked on the test data."""
    training = ("data.path", str(spec.path), files(str(spec.path)))
    held_out = [(f"data.{key}", getattr(spec, key), files(getattr(spec, key)))
                for key in ("eval_path", "val_path") if getattr(spec, key) is not None]
    for part in held_out:
        problem = shared_files(training, part)
        if problem:
            raise DataError(problem)
    if len(held_out) == 2 and (problem := shared_files(*held_out)):
        logger.warning("%s", problem)


def shared_files(first: tuple[str, str, list[str]], second: tuple[str, str, list[str]]) -> str | None:
    """What is wrong when two parts of the data, each (recipe key, pattern, files), name the same file (under any
    path): the held-out `second` would score data that `first` trains on (or, `first` the test split, validation
    would select on test data)."""
    def real(name: str) -> str:
        return os.path.realpath(name) if os.path.exists(name) else name

    seen = {real(name) for name in first[2]}
    shared = [name for name in second[2] if real(name) in seen]
    if not shared:
        return None
    why = ("their samples would be trained on and scored as held out" if first[0] == "data.path" else
           "the best epoch would be picked on test data")
    return (f"{second[0]}: {second[1]!r} and {first[0]} {first[1]!r} share {len(shared)} file(s) (first: "
            f"{shared[0]!r}): {why}; give {second[0]} files of its own")


def read_shards(pattern: str, spec: DataSpec) -> tuple[list[Row], bool]:
    """Rows of every sample of the shards; a sample without an image or a caption is a bad row, not a crash.
    Returns the rows and whether every sample has a label (a `cls` member or `data.label_column` in its json)."""
    from webdataset.tariterators import base_plus_ext

    rows, labelled = [], True
    for shard in expand_shards(pattern):
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:  # uncompressed, as webdataset writes: members can be seeked
                for member in tar:
                    key, ext = base_plus_ext(member.name)
                    if member.isfile() and key is not None and not Path(key).name.startswith("_"):
                        samples.setdefault(key, {})[ext.lower()] = member
                texts = {key: _text_of(tar, parts, spec) for key, parts in samples.items()}
        except tarfile.TarError as error:
            raise DataError(f"data.path: {shard} is not a readable uncompressed tar shard ({error})") from None
        for key, parts in samples.items():
            row = _row(shard, key, parts, texts[key])
            labelled = labelled and row.label is not None
            rows.append(row)
    return rows, labelled and bool(rows)


def _text_of(tar: tarfile.TarFile, parts: dict[str, tarfile.TarInfo], spec: DataSpec) -> tuple[str | None, ...]:
    """(caption, label, problem) of one sample: `txt` is the caption; a `json` may hold caption and label."""
    caption = label = None
    if "txt" in parts:  # undecodable bytes replaced, as the streaming reader reads them
        caption = tar.extractfile(parts["txt"]).read().decode("utf-8", "replace").strip() or None
    if "cls" in parts:
        label = tar.extractfile(parts["cls"]).read().decode("utf-8", "replace").strip() or None
    if "json" in parts:
        try:
            meta = json.loads(tar.extractfile(parts["json"]).read())
        except ValueError as error:
            return None, None, f"json member is not valid JSON ({error})"
        if not isinstance(meta, dict):
            return None, None, f"json member is a {type(meta).__name__}, not an object"
        try:
            caption = caption or _field(meta, spec.text_column, "caption")
            label = label or _field(meta, spec.label_column)
        except _NotText as error:
            return None, None, str(error)
        if caption is None and label is None:
            return None, None, (f"no caption (no .txt member, and the json has no 'caption' or {spec.text_column!r} "
                                f"key; its keys: {', '.join(map(str, meta)) or 'none'})")
    return caption, label, None


class _NotText(ValueError):
    """A json field that would be a caption or label but holds a list or an object (several captions, say)."""


def _field(meta: dict, *names: str) -> str | None:
    """The first of `names` the json has, as text; a list or object there is not one caption or label."""
    for name in names:
        value = meta.get(name)
        if isinstance(value, (list, dict)):
            raise _NotText(f"json {name!r} is a {type(value).__name__}, not one caption or label per sample")
        if value not in (None, ""):
            return str(value)
    return None


def _row(shard: str, key: str, parts: dict[str, tarfile.TarInfo], text: tuple[str | None, ...]) -> Row:
    caption, label, problem = text
    where = f"{Path(shard).name}:{key}"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
    if problem is None and image_ext is None:
        problem = f"no image member (one of .{', .'.join(IMAGE_EXTENSIONS)}; found .{', .'.join(parts)})"
    if problem is None and caption is None and label is None:
        problem = "no caption (a .txt member, or a json with a 'caption' or data.text_column key)"
    if problem is not None:
        return Row("", None, None, where, problem)
    member = parts[image_ext]
    return Row(ShardImage(shard, member.name, member.offset_data, member.size), label, caption, where)

