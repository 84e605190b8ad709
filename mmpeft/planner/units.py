"""Memory sizes as people write them ('24GiB', '80GB', '512MiB') and as the planner prints them (binary units)."""

from __future__ import annotations

import re

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
UNIT_HELP = "GiB, MiB, KiB, TiB (binary, 1024-based) or GB, MB, KB, TB (decimal)"


def parse_memory(text: str | int) -> int:
    """'24GiB', '80GB', '1.5 TiB' -> bytes; an int is bytes already. A unit is required: '24' alone is ambiguous.

    GPU vendors quote binary sizes in decimal-looking names ("80GB" for 80 GiB); both spellings are accepted and
    mean what they say (GB = 10^9 bytes), so write GiB when the card's memory is meant.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"memory size must be positive, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if match is None:
        raise ValueError(f"memory size {text!r}: expected a number and a unit, e.g. 24GiB or 80GB; units: {UNIT_HELP}")
    number, unit = float(match.group(1)), match.group(2)
    if not unit:
        raise ValueError(f"memory size {text!r}: give a unit, e.g. {match.group(1)}GiB or {match.group(1)}GB; "
                         f"units: {UNIT_HELP}")
    if unit.lower() not in UNITS:
        raise ValueError(f"memory size {text!r}: unknown unit {unit!r}; units: {UNIT_HELP}")
    if number <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(number * UNITS[unit.lower()])


def format_bytes(size: float) -> str:
    """Binary units with three significant digits: '1.50 GiB', '812 MiB', '96.0 KiB', '12 B'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    return f"{int(size)} B"
