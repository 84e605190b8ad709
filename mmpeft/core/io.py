"""Atomic file writes (temp file + rename) and the user cache folder: a killed run never leaves a corrupt file."""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The checkout (or installed tree) that holds recipes/ and adapters/ beside the package.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROCESS_STARTED = time.time()  # a staging folder older than this process, with no live lock, was left by a killed one
# How a full disk shows through the writers: OSError ENOSPC, safetensors' Rust error, torch.save's C++ stream.
DISK_FULL_SIGNS = ("No space left", "os error 28", "StorageFull", "basic_ios::clear", "failed writing file",
                   "Disk quota exceeded")


class OutputError(OSError):
    """An output that could not be written (disk full, read-only folder), said in one line with what to do."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(sign in str(error) for sign in DISK_FULL_SIGNS)


def disk_full(where: str | Path, kept: str = "nothing half-written was left") -> OutputError:
    return OutputError(errno.ENOSPC, f"no space left on the device while writing {where}: {kept}; free some space "
                                     "and run the command again")


def make_output_dir(path: Path, what: str = "run folder") -> None:
    """mkdir -p, its failure said in one line (a virtual file system such as /proc gave a bare ENOENT)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(error.errno, f"cannot create the {what} {path}: {error.strerror}; choose a writable "
                                       "output.dir") from None


SHARED_CACHES_ENV = "MMPEFT_SHARED_CACHES"  # "1" in grid workers: per-process caches go to the cache folder


def caches_shared() -> bool:
    """True in a grid's worker processes: image features and decoded images that one process would keep in memory
    are written to the cache folder too, so the other workers on the machine reuse them instead of recomputing."""
    return os.environ.get(SHARED_CACHES_ENV) == "1"


def cache_dir(*parts: str) -> Path:
    """`$MMPEFT_CACHE` (default ~/.cache/mmpeft) joined with `parts`, created on demand."""
    root = Path(os.environ.get("MMPEFT_CACHE", Path.home() / ".cache" / "mmpeft")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); the result should read like any file
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(error) and not isinstance(error, OutputError):
            raise disk_full(path) from None
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; it becomes `path` only if the block succeeds, else it is removed.

    An existing `path` must be an empty folder: a finished export or model is never overwritten half-way.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not an empty folder; choose another path or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=path.parent))
    lock = _hold_lock(Path(f"{staging}.lock"))  # released by the OS if this process is killed: then it is stale
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); the result should read like any folder
        yield staging
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error) and not isinstance(error, OutputError):
            raise disk_full(path) from None
        raise
    finally:
        Path(f"{staging}.lock").unlink(missing_ok=True)
        os.close(lock)


def remove_stale_staging(path: str | Path) -> list[Path]:
    """Remove the staging folders of `path` that a killed process left (`kill -9` runs no cleanup): those whose lock
    no live process holds, or, without a lock, older than this process. Returns what was removed."""
    path = Path(path)
    removed = []
    for staging in path.parent.glob(f".{path.name}.*.staging"):
        lock = Path(f"{staging}.lock")
        if lock.exists():
            try:
                handle = os.open(lock, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live export or merge is writing it
            finally:
                os.close(handle)
        elif staging.stat().st_mtime >= PROCESS_STARTED:
            continue
        shutil.rmtree(staging, ignore_errors=True)
        lock.unlink(missing_ok=True)
        removed.append(staging)
    return removed


def _hold_lock(lock: Path) -> int:
    handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | Path, rows: Iterable[dict], columns: Sequence[str]) -> None:
    """`rows` as CSV with `columns` (others ignored, None as empty), written atomically like write_text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text(path, buffer.getvalue())


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_hashes(directory: str | Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `directory` by its relative path (POSIX separators), except the names in `skip`."""
    directory = Path(directory)
    return {path.relative_to(directory).as_posix(): sha256_file(path) for path in sorted(directory.rglob("*"))
            if path.is_file() and path.name not in skip}
