"""Methods: one module each, registered by name (one import line below each). `METHODS` is the only list."""

from __future__ import annotations

import mmpeft.methods.bitfit  # noqa: F401
import mmpeft.methods.bottleneck  # noqa: F401
import mmpeft.methods.full  # noqa: F401
import mmpeft.methods.ia3  # noqa: F401
import mmpeft.methods.lora  # noqa: F401
import mmpeft.methods.probe  # noqa: F401
import mmpeft.methods.prompt  # noqa: F401
import mmpeft.methods.zero_shot  # noqa: F401
from mmpeft.methods.base import METHODS, Method, MethodConfig, count_parameters
from mmpeft.methods.support import render_support_table, support_matrix

__all__ = ["METHODS", "Method", "MethodConfig", "count_parameters", "render_support_table", "support_matrix"]
