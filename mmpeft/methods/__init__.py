"""Methods: one module each, registered by name. `METHODS` is the only list of them."""

from __future__ import annotations

import importlib

from mmpeft.methods.base import METHODS, Method, MethodConfig, count_parameters
from mmpeft.methods.support import render_support_table, support_matrix

METHOD_MODULES = ("zero_shot", "full", "lora", "ia3", "bottleneck", "bitfit", "prompt", "probe")

for _module in METHOD_MODULES:
    importlib.import_module(f"mmpeft.methods.{_module}")

__all__ = ["METHODS", "Method", "MethodConfig", "count_parameters", "render_support_table", "support_matrix"]
