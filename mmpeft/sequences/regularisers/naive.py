"""Naive sequential fine-tuning: no regulariser at all. The baseline every other one is measured against."""

from __future__ import annotations

from mmpeft.sequences.regularisers.base import Regulariser, register


@register
class Naive(Regulariser):
    """Trains each task as if it were the only one; forgetting is whatever that costs."""

    name = "naive"
