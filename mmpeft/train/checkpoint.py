"""Training checkpoints on disk. Written beside the last one and swapped in, so an interrupted or failed save (a
full disk) leaves the previous checkpoint intact; read back with a damaged or truncated file reported as one
CheckpointError naming it, not a traceback from safetensors, pickle or json."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmpeft.core.io import OutputError, disk_full, is_disk_full, write_json

PROGRESS, TRAINABLE, BEST, OPTIMIZER = "progress.json", "trainable.safetensors", "best.safetensors", "optimizer.pt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, with the file and what to do."""


def write_checkpoint(final: Path, trainable: dict, best: dict | None, extra: dict, progress: dict) -> None:
    """Staged beside `final`, then swapped in; a failure removes the staging folder and keeps `final` as it was."""
    staging = final.with_name("staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        save_file(trainable, str(staging / TRAINABLE))
        if best is not None:
            save_file(best, str(staging / BEST))
        torch.save(extra, staging / OPTIMIZER)
        write_json(staging / PROGRESS, progress)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error) and not isinstance(error, OutputError):
            kept = (f"the previous checkpoint {final} is intact (continue from it with `mmpeft run --resume "
                    f"{final.parent.parent}`)" if (final / PROGRESS).is_file() else "no checkpoint was kept")
            raise disk_full(staging, kept) from None
        raise
    old = final.with_name("previous")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(directory: Path) -> tuple[dict, dict | None, dict, dict]:
    """(trainable state, best state or None, optimizer/scheduler/rng, progress) of a checkpoint folder."""
    progress = _read(directory / PROGRESS, lambda path: json.loads(path.read_text()), dict)
    trainable = _read(directory / TRAINABLE, lambda path: load_file(str(path)), dict)
    best = _read(directory / BEST, lambda path: load_file(str(path)), dict) if (directory / BEST).is_file() else None
    extra = _read(directory / OPTIMIZER, lambda path: torch.load(path, weights_only=True), dict)
    missing = {"optimizer", "scheduler", "rng"} - set(extra)
    if missing:
        raise _damaged(directory / OPTIMIZER, f"it lacks {', '.join(sorted(missing))}")
    return trainable, best, extra, progress


def _read(path: Path, reader, expected: type):
    try:
        value = reader(path)
    except FileNotFoundError:
        raise _damaged(path, "it is missing") from None
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, pickle.UnpicklingError, EOFError,
            RuntimeError, OSError, ValueError) as error:
        raise _damaged(path, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                       ) from None
    if not isinstance(value, expected):
        raise _damaged(path, f"it holds a {type(value).__name__}, not a {expected.__name__}")
    return value


def _damaged(path: Path, why: str) -> CheckpointError:
    run_dir = path.parent.parent.parent  # <run>/checkpoints/last/<file>
    return CheckpointError(f"checkpoint file {path} cannot be read ({why[:200]}): the checkpoint is damaged and "
                           f"cannot be resumed; start the run over (remove {run_dir} and run the recipe again)")
