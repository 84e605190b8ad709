"""A run folder: claimed once, logged to, and written whole (staged saves renamed into place)."""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate.utils import broadcast_object_list

from mmpeft.core.distributed import process_state
from mmpeft.core.io import write_text

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.methods import Method
    from mmpeft.specs import Recipe

logger = logging.getLogger("mmpeft")

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"


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
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / RECIPE_FILE, recipe.to_yaml())
    state.wait_for_everyone()
    return run_dir


def save_adapter(method: Method, backbone: Backbone, recipe: Recipe, run_dir: Path) -> None:
    """Saved into a staging folder and renamed: the adapter folder is complete or absent."""
    if not method.trains:
        return
    final, staging = run_dir / ADAPTER_DIR, run_dir / f".{ADAPTER_DIR}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    method.save(backbone, recipe.method, staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)


class run_logging:
    """Log to <run>/train.log (appending on resume) for the duration of a run."""

    def __init__(self, run_dir: Path):
        main = process_state().is_main_process
        self.handler = logging.FileHandler(run_dir / "train.log") if main else logging.NullHandler()
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self):
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
