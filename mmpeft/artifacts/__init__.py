"""Export: a run as a merged model or its adapter alone, weighted merges of several runs' adapters, and the loader.

- `export(run_dir, out, how="auto"|"merged"|"adapter", dtype=None, verify=True, tolerance=None, onnx=False)`
- `merge(run_dirs, weights, how="linear"|"ties"|"dare_linear"|"dare_ties", density=None, out=...)`
- `load_adapter(folder, base=None)` -> an mmpeft backbone; `export_labels(folder)` -> its label set
- `mmpeft.artifacts.predict.predict(run_or_export, images, ...)` -> one row per image (not re-exported here: the
  function would shadow its module)

Every output folder is written beside its destination and renamed into place only when complete and verified.
"""

from __future__ import annotations

from mmpeft.artifacts.combine import MERGE_HOWS, merge
from mmpeft.artifacts.loading import MANIFEST, export_labels, load_adapter, read_manifest
from mmpeft.artifacts.runs import ExportError, read_run
from mmpeft.artifacts.single import HOWS, export
from mmpeft.artifacts.verify import DEFAULT_TOLERANCE

__all__ = ["DEFAULT_TOLERANCE", "HOWS", "MANIFEST", "MERGE_HOWS", "ExportError", "export", "export_labels",
           "load_adapter", "merge", "read_manifest", "read_run"]

