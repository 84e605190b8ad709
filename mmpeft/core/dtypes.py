"""Recipe dtype names -> torch dtypes (one table for loading, quantization and the planner)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
