"""The shipped recipes, ready to check: the shards a recipe's header says to write first, written."""

from __future__ import annotations

import re
from pathlib import Path

from mmpeft.core.io import PROJECT_ROOT

SHIPPED = sorted((PROJECT_ROOT / "recipes").glob("*.yaml"))
FIRST_ONCE = re.compile(r"python -m mmpeft\.data\.write_shards ([^\s)]+ [^\s)]+(?: --per-shard \d+)?)")


def prepare(path: Path, scratch: Path, monkeypatch) -> None:
    """Run the `write_shards` commands of the recipe's header in `scratch` (which sees recipes/), made the cwd."""
    commands = FIRST_ONCE.findall(path.read_text())
    if not commands:
        return
    from mmpeft.data.write_shards import main as write_shards

    (scratch / "recipes").symlink_to(PROJECT_ROOT / "recipes")
    monkeypatch.chdir(scratch)
    for command in commands:
        write_shards(command.split())
