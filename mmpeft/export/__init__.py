"""Export: a run as a merged model or its adapter alone, weighted merges of several runs' adapters, and the loader.

- `export(run_dir, out, how="auto"|"merged"|"adapter", dtype=None, verify=True, tolerance=None, onnx=False)`
- `merge(run_dirs, weights, how="linear"|"ties"|"dare_linear"|"dare_ties", density=None, out=...)`
- `load_adapter(folder, base=None)` -> an mmpeft backbone; `export_labels(folder)` -> its label set

Every output folder is written beside its destination and renamed into place only when complete and verified.
"""

from __future__ import annotations

import sys
import types

from mmpeft.export.combine import MERGE_HOWS, merge
from mmpeft.export.loading import MANIFEST, export_labels, load_adapter, read_manifest
from mmpeft.export.runs import ExportError, read_run
from mmpeft.export.single import HOWS, export
from mmpeft.export.verify import DEFAULT_TOLERANCE

__all__ = ["DEFAULT_TOLERANCE", "HOWS", "MANIFEST", "MERGE_HOWS", "ExportError", "export", "export_labels",
           "load_adapter", "merge", "read_manifest", "read_run"]


class _CallableModule(types.ModuleType):
    """Importing this package rebinds `mmpeft.export` from the function to the package; calling the package keeps
    `mmpeft.export(run_dir, out, ...)` working after `from mmpeft.export import load_adapter`."""

    def __call__(self, *args, **kwargs) -> dict:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
