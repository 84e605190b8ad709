"""The layer rule of docs/ARCHITECTURE.md holds, and breaking it fails with the two module names.

import-linter (contracts in pyproject.toml) reads every import statement, those inside functions and TYPE_CHECKING
blocks included, so a lazy import is no way around a layer.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def lint(project: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([*LINT, "--no-cache", str(project / "pyproject.toml")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers_and_has_no_cycles():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "added", "expected"), [
    # a function-level import from the bottom layer up to the run pipeline
    ("core/io.py", "def _up():\n    from mmpeft.runs import single  # noqa\n",
     r"mmpeft\.core is not allowed to import mmpeft\.runs:\s+- mmpeft\.core\.io -> mmpeft\.runs\.single"),
    # siblings in one layer importing each other in a circle
    ("backbones/base.py", "def _back():\n    import mmpeft.backbones.dual_encoder  # noqa\n",
     r"No cycles are allowed in mmpeft\.backbones"),
    # production code reaching for the test helpers
    ("methods/base.py", "def _helpers():\n    import mmpeft.testing  # noqa\n",
     r"mmpeft\.methods\.base -> mmpeft\.testing"),
])
def test_breaking_a_layer_fails_naming_both_modules(tmp_path, module, added, expected):
    shutil.copytree(ROOT / "mmpeft", tmp_path / "mmpeft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "mmpeft" / module, "a") as handle:
        handle.write("\n\n" + added)
    result = lint(tmp_path)
    assert result.returncode != 0
    assert re.search(expected, result.stdout), result.stdout


def test_no_code_asks_a_backbone_what_it_is():
    """Capabilities are methods of the Backbone interface, not hasattr/getattr probes."""
    probes = [f"{path.relative_to(ROOT)}:{number}" for path in sorted((ROOT / "mmpeft").rglob("*.py"))
              for number, line in enumerate(path.read_text().splitlines(), 1)
              if re.search(r"(hasattr|getattr)\((self\.)?backbone\b", line)]
    assert probes == []


def test_public_functions_that_take_a_backbone_say_backbone():
    """docs/ARCHITECTURE.md: a public function's `backbone` parameter is typed with the interface, not left untyped
    or typed nn.Module (what it may be asked is what Backbone declares)."""
    import ast

    untyped = []
    for path in sorted((ROOT / "mmpeft").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                untyped += [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                            for arg in node.args.args + node.args.kwonlyargs if arg.arg == "backbone"
                            and (arg.annotation is None or ast.unparse(arg.annotation) not in
                                 ("Backbone", "GenerativeBackbone", "DualEncoder"))]
    assert untyped == []
