"""Where a grid's cells run (`grid.executor`): in this process, in a local pool of processes, or on Ray.

Every executor runs the same function on the same Cell (mmpeft.grids.cells.run_cell): a cell's seed, split and
k-shot sample come from its recipe, never from the worker or the order, so per-cell metrics are the same whichever
runs it. Workers write only their cell's folder and send its results row back; the driver alone writes results,
summary and report. A cell that raises, or whose worker dies, becomes a failed row and the others go on.

- sequential: one cell after another in this process (image features of a frozen tower are shared in memory).
- processes: `max_parallel` long-lived worker interpreters (mmpeft.grids.worker), one cell each at a time: one
  per set of `gpus_per_cell` GPUs (CUDA_VISIBLE_DEVICES), else one per `cpus_per_cell` CPU slots, each with
  `threads_per_cell` torch threads. A worker that dies is replaced.
- ray: one Ray task per cell with num_cpus=cpus_per_cell and num_gpus=gpus_per_cell (fractions allowed) where the
  cluster has GPUs; `ray.init()` starts a local Ray unless grid.ray_address names one (`auto` joins a running
  cluster). Workers must see the grid folder: on several nodes it must be on shared storage (checked at start).

Workers of both pools share image features and decoded images through the cache folder of their machine
(MMPEFT_SHARED_CACHES, mmpeft.core.io.caches_shared): what one worker computed, the others read, not recompute.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

from mmpeft.core.io import SHARED_CACHES_ENV
from mmpeft.data.loader import CPUS_ENV
from mmpeft.grids.base import Cell, GridKind, GridSpec
from mmpeft.grids.cells import failed_row, run_cell
from mmpeft.runs.folder import METRICS_FILE

logger = logging.getLogger("mmpeft")

Finished = Callable[[Cell, dict], None]


class GridFolderNotShared(FileNotFoundError):
    """A worker cannot see the grid folder, so its cell folders would be lost (a user error: one line in the CLI)."""


class Progress:
    """A bar counting finished / running / failed cells, and one printed line per finished cell."""

    def __init__(self, kind: GridKind, total: int):
        from tqdm.auto import tqdm

        self.kind, self.total, self.running, self.failed, self.number = kind, total, 0, 0, 0
        self.bar = tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True, leave=False)

    def started(self) -> None:
        self.running += 1
        self.bar.set_postfix(running=self.running, failed=self.failed)

    def ended(self, cell: Cell, row: dict, was_running: bool = True) -> None:
        self.running -= int(was_running)
        self.number += 1
        ok = row["status"] == "ok"
        self.failed += int(not ok)
        self.bar.update(1)
        self.bar.set_postfix(running=self.running, failed=self.failed)
        shown = self.kind.shown(row) if ok else f"FAILED: {row['error']}"
        self.bar.write(f"[{self.number}/{self.total}] {cell.name}: {shown}", file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


class Executor:
    """Runs cells, calling `finished(cell, row)` in the driver as each ends; a context manager for its workers."""

    def __init__(self, grid: GridSpec, kind: GridKind, grid_dir: Path):
        self.grid, self.kind, self.grid_dir = grid, kind, grid_dir

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def start(self, cells: list[Cell]) -> None:
        """Start workers for the unfinished `cells` now, so they load while the driver runs what comes first."""

    @staticmethod
    def unfinished(cells: list[Cell]) -> list[Cell]:
        return [cell for cell in cells if not (cell.dir / METRICS_FILE).is_file()]

    def run(self, cells: list[Cell], finished: Finished) -> None:
        progress = Progress(self.kind, len(cells))
        try:
            todo = []
            for cell in cells:
                if (cell.dir / METRICS_FILE).is_file():  # finished earlier: its row comes from its folder, here
                    self._end(progress, finished, cell, run_cell(self.kind, cell), was_running=False)
                else:
                    todo.append(cell)
            if todo:
                self.run_todo(todo, progress, finished)
        finally:
            progress.close()

    def run_todo(self, cells: list[Cell], progress: Progress, finished: Finished) -> None:
        for cell in cells:
            progress.started()
            self._end(progress, finished, cell, run_cell(self.kind, cell))

    @staticmethod
    def _end(progress: Progress, finished: Finished, cell: Cell, row: dict, was_running: bool = True) -> None:
        finished(cell, row)
        progress.ended(cell, row, was_running)

    def probe_file(self) -> Path:
        """A file only this run writes: a worker that cannot read it does not share the grid folder. A killed
        driver's probe is removed first (this driver holds the folder's lock: no other one is using it)."""
        for stale in self.grid_dir.glob(".probe-*"):
            stale.unlink(missing_ok=True)
        path = self.grid_dir / f".probe-{uuid.uuid4().hex}"
        path.write_text(socket.gethostname())
        return path

    def not_shared(self, host: str) -> GridFolderNotShared:
        return GridFolderNotShared(
            f"grid folder {self.grid_dir.resolve()} is not visible from a worker on {host}: on a cluster of several "
            "machines the grid folder (output.dir) must be on storage every node mounts at the same path")


class SequentialExecutor(Executor):
    """In this process, one cell after another (the default)."""


class Worker:
    """One worker interpreter (mmpeft.grids.worker) and the connection to it; `cell` is what it runs now."""

    def __init__(self, kind_name: str, threads: int, probe: Path, env: dict[str, str]):
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        paths = os.pathsep.join(p for p in sys.path if p)  # the driver's imports, mmpeft's checkout included
        command = [sys.executable, "-m", "mmpeft.grids.worker", str(theirs.fileno()), kind_name, str(threads),
                   str(probe)]
        self.process = subprocess.Popen(command, pass_fds=(theirs.fileno(),),
                                        env={**os.environ, **env, "PYTHONPATH": paths})
        theirs.close()
        self.connection = Connection(ours.detach())
        self.env, self.cell, self.ready, self.dead = env, None, False, False

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.connection.send(None)  # a busy worker reads it only after its cell: then it is killed
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.connection.close()


class ProcessExecutor(Executor):
    """A local pool of worker interpreters; a dead worker's cell is recorded as failed and the worker replaced."""

    workers: list[Worker] | None = None  # started by start(), before the driver's own rows
    probe: Path | None = None

    def slots(self, cells: int) -> list[dict[str, str]]:
        """Each worker's environment: its threads, CPU slots and shared caches, and its GPUs where there are any."""
        import torch

        threads = {"OMP_NUM_THREADS": str(self.grid.threads_per_cell), SHARED_CACHES_ENV: "1",
                   CPUS_ENV: str(self.grid.cpus_per_cell)}
        limit = min(self.grid.max_parallel or cells, cells)
        if torch.cuda.is_available():
            per = int(self.grid.gpus_per_cell)
            gpus = list(range(torch.cuda.device_count()))
            sets = [gpus[i:i + per] for i in range(0, len(gpus) - per + 1, per)]
            if not sets:
                raise ValueError(f"grid.gpus_per_cell: {per} GPUs per cell, but this machine has {len(gpus)}")
            return [{**threads, "CUDA_VISIBLE_DEVICES": ",".join(map(str, s))} for s in sets[:limit]]
        cpus = len(os.sched_getaffinity(0))
        if self.grid.cpus_per_cell > cpus:  # one worker with fewer CPUs than asked would break the recipe's promise
            raise ValueError(f"grid.cpus_per_cell: {self.grid.cpus_per_cell:g} CPUs per cell, but this machine has "
                             f"{cpus}; lower grid.cpus_per_cell (or use grid.executor: ray with a larger cluster)")
        return [threads] * min(int(cpus // self.grid.cpus_per_cell), limit)

    def start(self, cells: list[Cell]) -> None:
        todo = self.unfinished(cells)
        if todo and self.workers is None:
            self.probe = self.probe_file()
            threads = self.grid.threads_per_cell
            self.workers = [Worker(self.kind.name, threads, self.probe, env) for env in self.slots(len(todo))]

    def __exit__(self, *exc) -> None:
        for worker in self.workers or []:
            worker.stop()
        if self.probe is not None:
            self.probe.unlink(missing_ok=True)
        self.workers = self.probe = None

    def run_todo(self, cells: list[Cell], progress: Progress, finished: Finished) -> None:
        from multiprocessing.connection import wait

        self.start(cells)
        workers, pending = self.workers, deque(cells)
        while pending or any(w.cell for w in workers):
            for i, worker in enumerate(workers):
                if worker.dead and pending:  # replaced only while there is work for it
                    workers[i] = Worker(self.kind.name, self.grid.threads_per_cell, self.probe, worker.env)
                elif worker.ready and worker.cell is None and pending:
                    worker.cell = pending.popleft()
                    worker.connection.send(worker.cell)
                    progress.started()
            live = [w for w in workers if not w.dead]
            wait([w.connection for w in live])  # a message, or end of file from a worker that died
            for worker in live:
                self._receive(worker, progress, finished)

    def _receive(self, worker: Worker, progress: Progress, finished: Finished) -> None:
        """Handle what the worker sent: that it is ready, its cell's row, or (its socket closed) its death."""
        try:
            if not worker.connection.poll():
                return
            message = worker.connection.recv()
        except (EOFError, OSError):  # its end of the socket closed: the process is gone
            self._died(worker, progress, finished)
            return
        if message[0] == "ready":
            _, visible, host = message
            if not visible:
                raise self.not_shared(host)
            worker.ready = True
        else:
            cell, worker.cell = worker.cell, None
            self._end(progress, finished, cell, message[1])

    def _died(self, worker: Worker, progress: Progress, finished: Finished) -> None:
        code = worker.process.wait()
        worker.dead = True
        if worker.cell is None:  # it never ran a cell: starting it again would fail the same way
            raise RuntimeError(f"a grid worker process exited while starting (exit code {code}); see the messages "
                               "above")
        cell, worker.cell = worker.cell, None
        message = f"WorkerDied: the worker process running this cell exited with code {code}"
        self._end(progress, finished, cell, failed_row(self.kind, cell, message, message))


__all__ = ["Executor", "GridFolderNotShared", "ProcessExecutor", "SequentialExecutor"]
