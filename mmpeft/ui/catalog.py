"""What lies under RUNS_DIR, read from the files the runners write: kinds, status, numbers, reports, plots, logs.

The one reader of run folders for the web app (and testable without it). Shapes, from the code that writes them:
  run        recipe.yaml (+ train.log, checkpoints/ while it trains; metrics.json, report.md, *.png once finished)
  continual  recipe.yaml with `tasks:` (+ state/ between tasks; metrics.json, report.md, *.png once finished)
  grid       compare.yaml (+ compare.log, cells/<cell>/ run folders, results.csv/json; summary.json, summary.md,
             report.md and *.png once finished); its first line names the command (compare, fewshot, search)
  search     search.yaml (+ search.log, trials/<n>-<method>/ run folders, search/leaderboard.*); once its trials
             are done, the grid of the chosen configurations in the same folder (compare.yaml, cells/)
Status: finished (metrics.json, or a grid's summary.json), failed (a grid cell's error.txt, or a UI launch that
ended with an error), running (a live UI launch, or a held folder whose log, or a cell's, was written to in the last
RUNNING_SECONDS), interrupted (anything else that stopped early: `--resume` continues it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from mmpeft.grids.base import GRID_RECIPE
from mmpeft.grids.cells import ERROR_FILE
from mmpeft.grids.search import SEARCH_RECIPE
from mmpeft.runs.folder import LOCK_FILE, METRICS_FILE, RECIPE_FILE
from mmpeft.sequences.runner import STATE_DIR

logger = logging.getLogger("mmpeft")

UI_DIR = ".ui"  # the web app's own files under RUNS_DIR: launch records and logs, saved recipes, uploads
RUNNING_SECONDS = 300  # a log written to this recently (and no finished file) counts as a live run
MAX_DEPTH = 4  # how deep under RUNS_DIR folders are looked for (cells of grids are listed with their grid)
DAMAGED = "damaged"  # a folder whose recipe or metrics file cannot be read: listed, marked, not trusted
COLUMNS = ["path", "kind", "recipe", "backbone", "method", "status", "accuracy", "trainable %", "seconds",
           "modified"]


class OutsideError(ValueError):
    """A typed or uploaded path that resolves outside the folder it must stay in."""


@dataclass
class Entry:
    path: str  # relative to RUNS_DIR: what the table shows and what the UI passes back
    kind: str  # run, cell, trial, continual, compare, fewshot, regularisers, search
    recipe: str = ""
    backbone: str = ""
    method: str = ""
    status: str = "interrupted"
    accuracy: float | None = None
    trainable_percent: float | None = None
    seconds: float | None = None
    modified: str = ""

    def row(self) -> list:
        return [self.path, self.kind, self.recipe, self.backbone, self.method, self.status,
                _rounded(self.accuracy), _rounded(self.trainable_percent, 3), _rounded(self.seconds, 1),
                self.modified]


def inside(root: str | Path, candidate: str | Path) -> Path:
    """`candidate` (relative to `root`, or absolute) with links resolved; refuses anything outside `root`."""
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(base / candidate))
    if target != base and base not in target.parents:
        raise OutsideError(f"{str(candidate)!r} resolves to {target}, outside {base}; only paths inside it are "
                           f"allowed")
    return target


def scan(root: str | Path, launches: dict[str, str] | None = None) -> list[Entry]:
    """Every run, grid (with its cells) and continual sequence under `root`, newest first.

    `launches` maps a folder (relative path) to the status of the UI launch that writes it (mmpeft.ui.launch).
    """
    root = Path(root)
    entries: list[Entry] = []
    if root.is_dir():
        _walk(root, root, 0, entries, launches or {})
    return sorted(entries, key=lambda e: e.modified, reverse=True)


def _walk(root: Path, folder: Path, depth: int, entries: list[Entry], launches: dict[str, str]) -> None:
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entry = classify(root, child, launches)
        if entry is not None:
            entries.append(entry)
            if entry.kind not in ("run", "continual"):
                entries += _members(root, child, launches)
        elif depth + 1 < MAX_DEPTH:
            _walk(root, child, depth + 1, entries, launches)


def _members(root: Path, folder: Path, launches: dict[str, str]) -> list[Entry]:
    """A grid's cells and a search's trials, listed with it."""
    found = []
    for members in (folder / "cells", folder / "trials"):
        for member in sorted(p for p in members.iterdir() if p.is_dir()) if members.is_dir() else ():
            entry = classify(root, member, launches, cell=True)
            if entry is not None:
                found.append(entry)
    return found


def classify(root: Path, folder: Path, launches: dict[str, str] | None = None, cell: bool = False) -> Entry | None:
    """The entry for one folder, or None when it is none of the shapes above; a folder whose files cannot be read
    (hand-edited, truncated, binary) is a `damaged` entry, so the table still lists everything else."""
    relative = folder.relative_to(root).as_posix()
    launched = (launches or {}).get(relative)
    for name, kind, read in ((GRID_RECIPE, "compare", _grid_entry), (SEARCH_RECIPE, "search", _search_entry),
                             (RECIPE_FILE, "run", lambda f, r, la: _run_entry(f, r, la, cell))):
        if (folder / name).is_file():
            try:
                entry = read(folder, relative, launched)
            except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as error:
                logger.debug("runs table: %s is damaged: %s", relative, type(error).__name__)
                return Entry(relative, kind, status=DAMAGED, modified=_modified(folder))
            if _unreadable(folder):
                entry.status = DAMAGED
            return entry
    return None


def _unreadable(folder: Path) -> bool:
    """A recipe or metrics file that is there but is not a mapping (the runners write them whole, by rename)."""
    recipes = [folder / n for n in (RECIPE_FILE, GRID_RECIPE, SEARCH_RECIPE) if (folder / n).is_file()]
    metrics = folder / METRICS_FILE
    return (any(not _read_yaml(path) for path in recipes)
            or metrics.is_file() and not isinstance(_read_json(metrics), dict))


def _run_entry(folder: Path, relative: str, launched: str | None, cell: bool) -> Entry:
    recipe = _read_yaml(folder / RECIPE_FILE)
    continual = "tasks" in recipe
    method = recipe.get("method") or {}
    kind = "continual" if continual else (("trial" if folder.parent.name == "trials" else "cell") if cell else "run")
    entry = Entry(relative, kind, str(recipe.get("name", "")),
                  str((recipe.get("backbone") or {}).get("id", "")),
                  str(method.get("name", "")) if isinstance(method, dict) else str(method))
    metrics = _read_json(folder / METRICS_FILE)
    if metrics is not None:
        entry.status = "finished"
        params = metrics.get("params") or {}
        entry.trainable_percent = params.get("percent")
        if continual:
            entry.accuracy = (metrics.get("summary") or {}).get("average_accuracy")
            entry.seconds = continual_seconds(metrics)
        else:
            entry.accuracy = (metrics.get("test") or {}).get("accuracy")
            entry.seconds = (metrics.get("train") or {}).get("seconds")
    else:
        log = folder / "train.log"
        entry.status = _unfinished_status(folder, log, launched, resumable=(folder / "checkpoints").is_dir()
                                          or (folder / STATE_DIR).is_dir())
    entry.modified = _modified(folder)
    return entry


def _grid_entry(folder: Path, relative: str, launched: str | None) -> Entry:
    text = (folder / GRID_RECIPE).read_text()
    recipe = yaml.safe_load(text) or {}
    grid = recipe.get("grid") or {}
    words = text.split()
    command = words[2] if text.startswith("# mmpeft ") and len(words) > 2 else "compare"
    kind = "regularisers" if grid.get("kind") == "regularisers" or grid.get("regularisers") else command
    labels = [m.get("label", m.get("name", "")) if isinstance(m, dict) else str(m)
              for m in grid.get("methods") or grid.get("regularisers") or []]
    entry = Entry(relative, kind, str(recipe.get("name", "")), str((recipe.get("backbone") or {}).get("id", "")),
                  ", ".join(labels))
    summary = _read_json(folder / "summary.json")
    rows = _read_json(folder / "results.json")
    rows = rows.get("rows", []) if isinstance(rows, dict) else (rows or [])
    if summary is not None:
        entry.status = "finished"
        best = _best_group(summary)
        if best is not None:
            entry.accuracy, entry.trainable_percent = best
        entry.seconds = sum(float(r.get("train_seconds") or 0) for r in rows) or None
    else:
        entry.status = _unfinished_status(folder, folder / "compare.log", launched, resumable=True,
                                          members=_member_logs(folder))
    entry.modified = _modified(folder)
    return entry


def _search_entry(folder: Path, relative: str, launched: str | None) -> Entry:
    recipe = _read_yaml(folder / SEARCH_RECIPE)
    methods = (recipe.get("search") or {}).get("methods") or []
    labels = [m.get("label", m.get("name", m.get("preset", ""))) if isinstance(m, dict) else str(m) for m in methods]
    entry = Entry(relative, "search", str(recipe.get("name", "")), str((recipe.get("backbone") or {}).get("id", "")),
                  ", ".join(labels))
    entry.status = _unfinished_status(folder, folder / "search.log", launched, resumable=True,
                                      members=_member_logs(folder))
    entry.modified = _modified(folder)
    return entry


def _best_group(summary) -> tuple[float | None, float | None] | None:
    groups = summary if isinstance(summary, list) else summary.get("groups", [])
    scored = []
    for group in groups:
        accuracy = group.get("accuracy") or group.get("average_accuracy")
        mean = accuracy.get("mean") if isinstance(accuracy, dict) else accuracy
        if isinstance(mean, (int, float)):
            scored.append((mean, group.get("trainable_percent")))
    return max(scored, key=lambda pair: pair[0]) if scored else None


def _unfinished_status(folder: Path, log: Path, launched: str | None, resumable: bool,
                       members: list[Path] = ()) -> str:
    """`members`: a grid's cell logs and a search's trial logs, which its workers write while the driver's own log
    stays quiet (processes, ray). Only a held folder (its lock file is there: a process that ended, even with an
    error, removed it) can be running."""
    if (folder / ERROR_FILE).is_file():
        return "failed"
    if launched is not None:  # the UI started it: the launch record knows best
        return launched
    if (folder / LOCK_FILE).is_file() and any(_live(path) for path in (log, *members)):
        return "running"
    return "interrupted" if resumable or not log.is_file() else "failed"


def _live(log: Path) -> bool:
    return log.is_file() and time.time() - log.stat().st_mtime < RUNNING_SECONDS and not _log_closed(log)


def _member_logs(folder: Path) -> list[Path]:
    return [*folder.glob("cells/*/train.log"), *folder.glob("trials/*/train.log")]


def _log_closed(log: Path) -> bool:
    """mmpeft.runs.folder.run_logging ends every run's log with `finished in`, whether the run ended well or not."""
    lines = tail(log, 1).strip()
    return lines.endswith(" s") and " finished in " in lines


def continual_seconds(metrics: dict) -> float | None:
    train = metrics.get("train")
    steps = train if isinstance(train, list) else [train]
    return sum(float(t.get("seconds") or 0) for t in steps if isinstance(t, dict)) or None


@dataclass
class Details:
    entry: Entry
    report: str  # report.md (or summary.md), images taken out: they are listed in `plots`
    plots: list[Path]
    recipe: str
    log: str
    log_file: Path | None

    def to_dict(self) -> dict:
        return {**asdict(self), "plots": [str(p) for p in self.plots], "log_file": str(self.log_file or "")}


def details(root: str | Path, relative: str, launches: dict[str, str] | None = None,
            launch_log: Path | None = None, log_lines: int = 40) -> Details:
    """Everything the report view shows for one folder of `root` (refusing folders outside it)."""
    root_path = Path(os.path.realpath(root))
    folder = inside(root_path, relative)
    entry = classify(root_path, folder, launches, cell=folder.parent.name in ("cells", "trials"))
    if entry is None:
        raise FileNotFoundError(f"{relative!r} is not a run, grid or continual folder (no {RECIPE_FILE} or "
                                f"{GRID_RECIPE} in {folder})")
    report_file = next((folder / n for n in ("report.md", "summary.md", "search/leaderboard.md")
                        if (folder / n).is_file()), None)  # a search still in its trials: its leaderboard
    report = (strip_images(report_file.read_text(errors="replace")) if report_file else
              "*No report yet: the run has not finished.*")
    plots = sorted(folder.glob("*.png")) + sorted(folder.glob("icl/*.png")) + sorted(folder.glob("search/*.png"))
    recipe_file = folder / {"run": RECIPE_FILE, "cell": RECIPE_FILE, "trial": RECIPE_FILE, "continual": RECIPE_FILE,
                            "search": SEARCH_RECIPE}.get(entry.kind, GRID_RECIPE)
    log_file = next((p for p in (folder / "train.log", folder / "compare.log", folder / "search.log")
                     if p.is_file()), None)
    if log_file is None and launch_log is not None and launch_log.is_file():
        log_file = launch_log
    log = tail(log_file, log_lines) if log_file else ""
    if entry.kind not in ("run", "cell", "trial", "continual"):  # cells in workers (processes, ray): a quiet driver log
        newest = max(_member_logs(folder), key=lambda p: p.stat().st_mtime, default=None)
        if newest is not None and (log_file is None or newest.stat().st_mtime > log_file.stat().st_mtime + 1):
            log += f"\n--- {newest.relative_to(folder).as_posix()} ---\n{tail(newest, log_lines // 2)}"
    return Details(entry, report, plots, recipe_file.read_text(errors="replace"), log, log_file)


INLINE_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]*)\)")


def strip_images(markdown: str) -> str:
    """Markdown images point at files beside report.md, which the page cannot reach: the gallery shows the plots,
    image lines go, and an image inside a line (a samples table's thumbnail) becomes its file name."""
    lines = (line for line in markdown.splitlines() if not line.lstrip().startswith("!["))
    return "\n".join(INLINE_IMAGE.sub(lambda match: f"({match.group(1)})", line) for line in lines)


def tail(path: Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last `lines` lines of a (possibly large, possibly growing) text file."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - max_bytes))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or being written by a runner that is not done with it
        return None


def _modified(folder: Path) -> str:
    newest = max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir() if p.is_file()])
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(newest))


def _rounded(value: float | None, digits: int = 4):
    return None if value is None else round(float(value), digits)
