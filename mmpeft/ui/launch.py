"""Check a recipe as `mmpeft check` does, start it as a detached `python -m mmpeft ...` process, stop it with SIGINT.

Everything a launch needs is a file under RUNS_DIR/.ui: the recipe as edited (recipes/<stamp>/<name>.yaml), the
launch record (launches/<folder>.json: pid, command) and the process's output (launches/<folder>.log). The run
folder itself is the ordinary one the CLI writes, so closing the browser or the UI changes nothing: the process runs
on in its own session, and `mmpeft run --resume` continues a stopped one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from mmpeft import validation
from mmpeft.core.io import write_json, write_text
from mmpeft.core.schema import RecipeError
from mmpeft.runs.folder import METRICS_FILE
from mmpeft.ui.catalog import UI_DIR, OutsideError, inside
from mmpeft.validation import recipe_command

RESUME_COMMANDS = {"run": "run", "cell": "run", "continual": "continual", "compare": "compare", "fewshot": "fewshot",
                   "regularisers": "compare", "search": "search"}


@dataclass
class Checked:
    """A recipe's validation: the command that runs it, the folder it will write, or every problem found."""
    command: str
    problems: list[str] = field(default_factory=list)
    resolved: str = ""  # the recipe with every default filled in, as `mmpeft check` prints it
    name: str = ""
    output_name: str | None = None
    folder: str = ""  # the run folder it will write, relative to RUNS_DIR (Launcher.check)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_recipe(path: Path, overrides: list[str]) -> Checked:
    """`mmpeft check`'s own validation (mmpeft.validation), its problems collected with their YAML paths."""
    try:
        command = recipe_command(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, AttributeError) as error:
        return Checked("run", [f"not valid YAML, or not a mapping: {error}"])
    try:
        checked = validation.check_recipe(path, overrides)
    except RecipeError as error:
        return Checked(command, list(error.problems))
    except (ValueError, FileNotFoundError) as error:  # what `mmpeft check` reports as one line
        return Checked(command, [str(error)])
    return Checked(checked.command, [], yaml.safe_dump(checked.resolved, sort_keys=False), checked.name,
                   checked.output_name)


class Launcher:
    """Launches under one RUNS_DIR; reads back launches of earlier UI sessions from their records."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(os.path.realpath(runs_dir))
        self.records = self.runs_dir / UI_DIR / "launches"
        self.children: dict[int, subprocess.Popen] = {}  # this session's processes, reaped when polled

    def stage(self, text: str, stem: str) -> Path:
        """The edited recipe saved as a file (the file the launch runs), named like the original."""
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(stem).stem) or "recipe"
        path = self.runs_dir / UI_DIR / "recipes" / datetime.now().strftime("%Y%m%d-%H%M%S-%f") / f"{safe}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
        return path

    def overrides(self, extra: list[str]) -> list[str]:
        return [f"output.dir={self.runs_dir}", *extra]

    def check(self, text: str, stem: str, extra: list[str]) -> tuple[Checked, Path]:
        """The recipe's problems, and those of the folder it would write (Check and Start say the same)."""
        path = self.stage(text, stem)
        checked = check_recipe(path, self.overrides(extra))
        if checked.ok:
            checked.folder = self.run_folder(checked)
        return checked, path

    def run_folder(self, checked: Checked) -> str:
        """The run folder relative to RUNS_DIR, or "" with the problem added: outside RUNS_DIR, or already there."""
        folder = checked.output_name or f"{checked.name}-{datetime.now():%Y%m%d-%H%M%S}"
        out_dir = ((yaml.safe_load(checked.resolved) or {}).get("output") or {}).get("dir") or self.runs_dir
        try:  # output.dir / output.name from the recipe or an override: the run folder must be under RUNS_DIR
            target = Path(os.path.abspath(Path(out_dir).expanduser() / folder))  # as the launch (same cwd) sees it
            folder = inside(self.runs_dir, target).relative_to(self.runs_dir).as_posix()
        except OutsideError as error:
            checked.problems.append(f"output: the run folder {error}; a launch writes under RUNS_DIR only (leave "
                                    "output.dir out, and make output.name a plain folder name)")
            return ""
        if (self.runs_dir / folder).exists():
            checked.problems.append(f"output.name: {folder!r} already exists under {self.runs_dir}; choose another "
                                    f"output.name (or continue it from the Runs tab)")
            return ""
        return folder

    def start(self, text: str, stem: str, extra: list[str]) -> Checked | dict:
        """Validate, then start; returns the problems (nothing started) or the launch record."""
        checked, path = self.check(text, stem, extra)
        if not checked.ok:
            return checked
        folder = checked.folder
        overrides = self.overrides(extra) + ([] if checked.output_name else [f"output.name={folder}"])
        return self._spawn([checked.command, str(path), *overrides], folder)

    def resume(self, relative: str, kind: str, extra: list[str] | None = None) -> dict:
        """`mmpeft <command> --resume FOLDER [overrides]`: continues from the folder's last checkpoint."""
        folder = inside(self.runs_dir, relative)
        command = RESUME_COMMANDS.get(kind)
        if kind == "trial":  # trials/<n>-<label>/ of a search: only the search continues (or retries) it
            search = folder.parent.parent.relative_to(self.runs_dir).as_posix()
            raise ValueError(f"a search's trial is not resumed on its own: resume its search, {search} (`mmpeft "
                             f"search --resume {folder.parent.parent}`)")
        if command is None:
            raise ValueError(f"a {kind} folder cannot be resumed")
        return self._spawn([command, "--resume", str(folder), *(extra or [])],
                           folder.relative_to(self.runs_dir).as_posix())

    def _spawn(self, arguments: list[str], folder: str) -> dict:
        self.records.mkdir(parents=True, exist_ok=True)
        name = folder.replace("/", "__")
        log = self.records / f"{name}.log"
        command = [sys.executable, "-m", "mmpeft", *arguments]
        offset = log.stat().st_size if log.is_file() else 0  # a resume appends to the folder's launch log
        with open(log, "ab") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.children[process.pid] = process
        record = {"folder": folder, "pid": process.pid, "command": command, "log": str(log), "log_offset": offset,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json(self.records / f"{name}.json", record)
        return record

    def launches(self) -> list[dict]:
        """Every launch record with its status now: running, finished, failed or interrupted."""
        found = []
        for path in sorted(self.records.glob("*.json")) if self.records.is_dir() else []:
            try:
                record = json.loads(path.read_text())
            except ValueError:
                continue
            record["status"] = self.status(record)
            found.append(record)
        return found

    def statuses(self) -> dict[str, str]:
        """{run folder: status} of the UI's launches, for mmpeft.ui.catalog.scan."""
        return {r["folder"]: r["status"] for r in self.launches() if r["status"] != "finished"}

    def status(self, record: dict) -> str:
        if self.alive(record["pid"]):
            return "running"
        log = Path(record["log"])
        text = log.read_bytes()[record.get("log_offset", 0):].decode(errors="replace") if log.is_file() else ""
        last = text.strip().splitlines()[-1] if text.strip() else ""
        if "interrupted" in last:
            return "interrupted"
        if last.startswith("error:") or "Traceback (most recent call last)" in text:
            return "failed"
        folder = self.runs_dir / record["folder"]
        if (folder / METRICS_FILE).is_file() or (folder / "summary.json").is_file():
            return "finished"
        return "interrupted"  # ended without a word (killed from outside): what it saved can be resumed

    def alive(self, pid: int) -> bool:
        child = self.children.get(pid)
        if child is not None:
            return child.poll() is None
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            return state != "Z"
        except (OSError, IndexError):
            return False

    def stop(self, folder: str) -> str:
        """SIGINT to the launch writing `folder`: the run saves its checkpoint and exits; `--resume` continues it."""
        for record in self.launches():
            if record["folder"] == folder and record["status"] == "running":
                try:
                    os.killpg(record["pid"], signal.SIGINT)
                except ProcessLookupError:  # it ended between the look and the signal
                    return f"{folder}: its launch (pid {record['pid']}) has already ended"
                return f"sent SIGINT to {folder} (pid {record['pid']}); continue it later with Resume"
        return f"{folder}: no running launch of this UI writes it"
