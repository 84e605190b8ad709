"""A `grid.executor: processes` worker: `python -m mmpeft.grids.worker FD KIND THREADS PROBE`.

Started by mmpeft.grids.executors.ProcessExecutor as a fresh interpreter (not multiprocessing's spawn, which would
re-run the caller's script), talking over the socket FD it inherits: it first says whether it sees the grid folder
(the PROBE file), then runs one cell at a time and sends back its row, until it receives None.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path


def worker_main(fd: int, kind_name: str, threads: int, probe: str) -> None:
    threading.Thread(target=exit_with_driver, args=(os.getppid(),), daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    import peft  # noqa: F401  (with bitsandbytes and torch.compile's modules: ~2 s each cell's first method pays)

    import mmpeft.grids  # noqa: F401  (registers the kinds)
    from mmpeft.grids.base import GRID_KINDS
    from mmpeft.grids.cells import run_cell

    connection = Connection(fd)
    kind = GRID_KINDS.get(kind_name)()
    connection.send(("ready", Path(probe).is_file(), socket.gethostname()))
    while True:
        try:
            cell = connection.recv()
        except EOFError:  # the driver went away
            return
        if cell is None:
            return
        connection.send(("row", run_cell(kind, cell)))


def exit_with_driver(driver: int) -> None:
    """A killed driver must not leave a worker writing a cell that a resumed grid runs again."""
    while os.getppid() == driver:
        time.sleep(1.0)
    os._exit(1)


if __name__ == "__main__":
    try:
        worker_main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4])
    except KeyboardInterrupt:  # Ctrl+C (or the UI's Stop) reaches the whole process group: the driver reports it
        sys.exit(130)
