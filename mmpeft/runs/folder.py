"""A run folder: claimed once, logged to, and written whole (staged saves renamed into place)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate.utils import broadcast_object_list

from mmpeft.core.distributed import process_state
from mmpeft.core.io import (
    OutputError,
    disk_full,
    folder_hashes,
    is_disk_full,
    make_output_dir,
    write_json,
    write_text,
)
from mmpeft.data import DataError, LabelSet

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.methods import Method
    from mmpeft.specs import Recipe

logger = logging.getLogger("mmpeft")

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"
# sha256 of every file of the saved state, written with it: export refuses a state changed after the run.
HASH_FILE = "mmpeft_hashes.json"
DATA_FILE = "data.json"  # the splits' fingerprints, written when the data is read: a resume must find the same
LABELS_FILE = "labels.json"  # the label set (keys, names, prompts): predict needs no data to rebuild it
LOCK_FILE = ".mmpeft.lock"  # flock-ed by the process writing the run: a second run with the same output.name is refused
_CLAIMS: dict[tuple[Path, int], int] = {}  # (run folder, thread) -> the open lock file it holds


def new_run_dir(recipe: Recipe) -> Path:
    """One folder per run, named by the main process (its clock) when several processes share the run."""
    state = process_state()
    name = [recipe.output.name or f"{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"]
    if state.num_processes > 1:
        broadcast_object_list(name)
    run_dir = Path(recipe.output.dir) / name[0]
    if (run_dir / METRICS_FILE).exists():
        raise FileExistsError(f"run folder {run_dir} already holds a finished run; choose another output.name")
    if state.is_main_process:
        make_output_dir(run_dir)
        claim_run_dir(run_dir)
        if (run_dir / METRICS_FILE).exists():  # finished while this process waited for the claim
            release_run_dir(run_dir)
            raise FileExistsError(f"run folder {run_dir} already holds a finished run; choose another output.name")
        try:
            write_text(run_dir / RECIPE_FILE, recipe.to_yaml())
        except BaseException:
            release_run_dir(run_dir)  # a long-lived worker process must not keep a folder it never ran in
            raise
    state.wait_for_everyone()
    return run_dir


def save_adapter(method: Method, backbone: Backbone, recipe: Recipe, run_dir: Path) -> None:
    """Saved into a staging folder and renamed: the adapter folder is complete or absent."""
    if not method.trains:
        return
    final, staging = run_dir / ADAPTER_DIR, run_dir / f".{ADAPTER_DIR}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        method.save(backbone, recipe.method, staging)
        write_json(staging / HASH_FILE, {"algorithm": "sha256", "files": folder_hashes(staging)})
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error) and not isinstance(error, OutputError):
            raise disk_full(final, "the trained state was not saved (its checkpoint, if any, is kept)") from None
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)


def claim_run_dir(run_dir: Path, folder: str = "run folder", holder: str = "run") -> None:
    """Hold run_dir's lock for this run (the OS drops it if the process dies); refuse a folder another run holds.
    `folder` and `holder` word the refusal (a grid folder held by another `mmpeft compare`)."""
    run_dir = Path(run_dir)
    try:
        handle = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise OutputError(error.errno, f"cannot write in the run folder {run_dir}: {error.strerror}; "
                                       "choose a writable output.dir") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.read(handle, 64).decode(errors="replace").strip() or "another process"
        os.close(handle)
        raise FileExistsError(f"{folder} {run_dir} is in use by another {holder} right now (process {pid}); "
                              f"give this {holder.strip('`')} another output.name, or wait for that one to finish"
                              ) from None
    os.ftruncate(handle, 0)
    os.write(handle, str(os.getpid()).encode())
    _CLAIMS[run_dir, threading.get_ident()] = handle


def release_run_dir(run_dir: Path) -> None:
    handle = _CLAIMS.pop((Path(run_dir), threading.get_ident()), None)
    if handle is not None:
        Path(run_dir, LOCK_FILE).unlink(missing_ok=True)
        os.close(handle)


def write_labels(run_dir: Path, labels: LabelSet) -> None:
    """The run's label set as exports carry it, so the run folder predicts after its data has moved."""
    if process_state().is_main_process:
        write_json(run_dir / LABELS_FILE, labels.to_dict())


def check_same_data(run_dir: Path, info: dict, resume: bool) -> None:
    """A new run records its splits' fingerprints; a resumed one must read the same rows into the same splits, or it
    would continue its optimizer and epoch count on other data (a table edited, images added or removed)."""
    fingerprints = info.get("fingerprints")
    path = run_dir / DATA_FILE
    if not fingerprints:
        return
    if not resume or not path.is_file():
        if process_state().is_main_process:
            write_json(path, {"where": info.get("where"), "fingerprints": fingerprints})
        return
    try:
        recorded = json.loads(path.read_text())["fingerprints"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OutputError(f"{path} is damaged ({error}); it records the data the run started with: remove it to "
                          "resume without that check") from None
    changed = [split for split in recorded if recorded[split] != fingerprints.get(split)]
    if changed:
        raise DataError(f"--resume {run_dir}: the data changed since the run started ({info.get('where')}: the "
                        f"{', '.join(changed)} split{'s' if len(changed) > 1 else ''} no longer hold the same rows); "
                        "a resumed run must train on the data it started with: restore it, or start a new run")


def discard_if_nothing_ran(run_dir: Path, command: str = "run") -> bool:
    """After a failed new run: remove its folder when it holds only what the start wrote (recipe, log, lock), so a
    failure leaves nothing behind; otherwise keep it and say where it is. Returns whether it was removed."""
    if not process_state().is_main_process or not run_dir.is_dir():
        return False
    if {p.name for p in run_dir.iterdir()} <= {RECIPE_FILE, "train.log", LOCK_FILE, DATA_FILE, LABELS_FILE}:
        release_run_dir(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        return True
    logger.error("the run folder %s keeps what ran before the error (train.log says more); continue it with "
                 "`mmpeft %s --resume %s` or remove it", run_dir, command, run_dir)
    return False


@contextmanager
def log_to(path: Path) -> Iterator[None]:
    """mmpeft's log also into `path` (a grid's or a search's own log, appended to on resume) while the block runs."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


class run_logging:
    """Log to <run>/train.log (appending on resume) for the duration of a run."""

    def __init__(self, run_dir: Path):
        main = process_state().is_main_process
        self.run_dir = Path(run_dir)
        self.handler = logging.FileHandler(run_dir / "train.log") if main else logging.NullHandler()
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self):
        if process_state().is_main_process and (self.run_dir, threading.get_ident()) not in _CLAIMS:
            try:
                claim_run_dir(self.run_dir)  # a resumed run claims its folder too: two resumes never write at once
            except BaseException:
                self.handler.close()
                raise
        logger.addHandler(self.handler)
        if not process_state().is_main_process:
            logger.setLevel(logging.WARNING)
        elif logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        logger.info("finished in %.1f s", time.perf_counter() - self.started)
        logger.removeHandler(self.handler)
        self.handler.close()
        release_run_dir(self.run_dir)
