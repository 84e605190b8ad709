"""`grid.executor: ray`: one Ray task per cell (pip install 'mmpeft[ray]').

`ray.init()` starts a local Ray (no dashboard) unless grid.ray_address names a cluster (`auto`: the one this machine
belongs to). Each task asks for grid.cpus_per_cell CPUs and, where the cluster has GPUs, grid.gpus_per_cell GPUs
(fractions share a GPU); Ray never retries a cell by itself (a failed cell is rerun by `--resume`). Before any cell
runs, a probe task on every node checks that it sees the grid folder: on several nodes it must be shared storage.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmpeft.core.io import SHARED_CACHES_ENV
from mmpeft.data.loader import CPUS_ENV
from mmpeft.grids.base import GRID_KINDS, Cell, GridSpec
from mmpeft.grids.cells import error_message, failed_row, run_cell
from mmpeft.grids.executors import Executor, Finished, Progress


def ray_cell(kind_name: str, threads: int, cpus: float, cell: Cell) -> dict:
    """A cell in a Ray worker: the same run_cell as every executor, with the grid's thread and CPU counts."""
    import torch

    torch.set_num_threads(threads)
    os.environ[SHARED_CACHES_ENV] = "1"  # features and decoded images shared with the other workers of this node
    os.environ[CPUS_ENV] = str(cpus)  # what its data loading may use
    import mmpeft.grids  # noqa: F401  (registers the kinds)

    return run_cell(GRID_KINDS.get(kind_name)(), cell)


def warm_up() -> None:
    """Imports every cell pays for once per Ray worker (torch, transformers, peft): done while the driver works."""
    import peft  # noqa: F401

    import mmpeft.grids  # noqa: F401


@contextmanager
def ray_session(grid: GridSpec) -> Iterator[None]:
    """Ray for a grid or a search: the running one if this process already called ray.init (left running), else a
    local one (no dashboard) or the cluster grid.ray_address names, shut down at the end."""
    import ray

    started = not ray.is_initialized()
    if started:
        if grid.ray_address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance needs no token
        try:
            ray.init(address=grid.ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except ConnectionError as error:  # no cluster there: the recipe's address is wrong, or it is not started
            raise ValueError(f"grid.ray_address: {grid.ray_address!r}: {error} Start the cluster first (`ray start "
                             "--head` on its head node), or leave grid.ray_address out for a local Ray") from None
    try:
        if started and grid.ray_address is None:
            check_fits(ray, grid)
        yield
    finally:
        if started:
            ray.shutdown()


def check_fits(ray, grid: GridSpec) -> None:
    """A local Ray has this machine's CPUs and GPUs and no more: a cell asking for more would wait forever."""
    resources = ray.cluster_resources()
    wanted = [("cpus_per_cell", grid.cpus_per_cell, resources.get("CPU", 0), "CPUs")]
    if resources.get("GPU", 0) > 0:
        wanted.append(("gpus_per_cell", grid.gpus_per_cell, resources["GPU"], "GPUs"))
    for key, asked, has, what in wanted:
        if asked > has:
            raise ValueError(f"grid.{key}: {asked:g} {what} per cell, but the local Ray on this machine has {has:g}; "
                             f"lower grid.{key} (or join a larger cluster with grid.ray_address)")


def cell_gpus(ray, grid: GridSpec) -> float:
    """GPUs a cell or trial asks for: grid.gpus_per_cell where the cluster has GPUs, else none."""
    return grid.gpus_per_cell if ray.cluster_resources().get("GPU", 0) > 0 else 0


def sees(path: str) -> tuple[str, bool]:
    return socket.gethostname(), Path(path).is_file()


class RayExecutor(Executor):
    def __enter__(self) -> RayExecutor:
        self.session = ray_session(self.grid)
        self.session.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.session.__exit__(*exc)

    def start(self, cells: list[Cell]) -> None:
        """One warm-up task per cell slot, so the workers that will run cells import while the driver works."""
        import ray

        gpus = cell_gpus(ray, self.grid)
        slots = min(self.grid.max_parallel or self.capacity(ray, gpus), len(self.unfinished(cells)))
        self.warming = [ray.remote(num_cpus=self.grid.cpus_per_cell, num_gpus=gpus, max_retries=0)(warm_up).remote()
                        for _ in range(slots)]

    def run_todo(self, cells: list[Cell], progress: Progress, finished: Finished) -> None:
        import ray

        gpus = cell_gpus(ray, self.grid)
        task = ray.remote(num_cpus=self.grid.cpus_per_cell, num_gpus=gpus, max_retries=0)(ray_cell)
        self.check_shared(ray)
        limit = self.grid.max_parallel or self.capacity(ray, gpus)
        pending, running = list(cells), {}
        while pending or running:
            while pending and len(running) < limit:
                cell = pending.pop(0)
                running[task.remote(self.kind.name, self.grid.threads_per_cell, self.grid.cpus_per_cell, cell)] = cell
                progress.started()
            (ref,), _ = ray.wait(list(running), num_returns=1)
            cell = running.pop(ref)
            try:
                row = ray.get(ref)
            except Exception as error:  # the task raised outside run_cell, or its worker died
                cause = getattr(error, "cause", None) or error
                row = failed_row(self.kind, cell, error_message(cause), str(error))
            self._end(progress, finished, cell, row)

    def capacity(self, ray, gpus: float) -> int:
        """Cells the cluster can hold at once."""
        resources = ray.cluster_resources()
        fits = int(resources.get("CPU", 1) // self.grid.cpus_per_cell)
        if gpus:
            fits = min(fits, int(resources.get("GPU", 0) // gpus))
        return max(1, fits)

    def check_shared(self, ray) -> None:
        """Every alive node must see a file the driver just wrote in the grid folder."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = self.probe_file()
        try:
            remote = ray.remote(num_cpus=0)(sees)
            nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
            answers = ray.get([remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                               .remote(str(probe)) for node in nodes])
        finally:
            probe.unlink(missing_ok=True)
        for host, visible in answers:
            if not visible:
                raise self.not_shared(host)
