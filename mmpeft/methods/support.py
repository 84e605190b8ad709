"""The method x backbone family x quantization support table, computed from what each method's `check` accepts.

README.md shows `render_support_table()` between its methods-table markers; a test keeps the two equal, so the
table cannot claim what the code refuses (or the reverse).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmpeft.core.schema import to_plain
from mmpeft.methods.base import METHODS
from mmpeft.specs import BackboneSpec, QuantizationSpec, Recipe

COLUMNS = ("dual_encoder", "generative", "4-bit", "8-bit")
MARKERS = ("<!-- methods-table:start -->", "<!-- methods-table:end -->")


def rows() -> list[tuple[str, str, object]]:
    """(method name, setting shown, config) for every method and each of its named variants."""
    found = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        for overrides in (cls.variants or {name: {}}).values():
            setting = ", ".join(f"{k}: {str(to_plain(v)).lower()}" for k, v in overrides.items())
            found.append((name, setting, cls.Config(**{"name": name, **overrides})))
    return found


def support_matrix(cuda: bool = True) -> dict[tuple[str, str], dict[str, bool]]:
    """{(method, setting): {column: accepted}}; quantized columns are for the method's first family."""
    return {(name, setting): {"dual_encoder": accepts(config, "dual_encoder", None, cuda),
                              "generative": accepts(config, "generative", None, cuda),
                              "4-bit": accepts(config, METHODS.get(name).families[0], 4, cuda),
                              "8-bit": accepts(config, METHODS.get(name).families[0], 8, cuda)}
            for name, setting, config in rows()}


def accepts(config, family: str, bits: int | None, cuda: bool) -> bool:
    """Whether recipe validation lets this method config run on this family at this quantization."""
    quantization = QuantizationSpec(bits=bits) if bits else None
    recipe = Recipe(method=config, backbone=BackboneSpec(family=family, quantization=quantization))
    return not METHODS.get(config.name).check(recipe, cuda=cuda)


def render_support_table() -> str:
    """Markdown for README's `## Methods` section: the CUDA table, then what differs on CPU."""
    cuda, cpu = support_matrix(cuda=True), support_matrix(cuda=False)
    lines = ["## Methods", "",
             "Generated from the code (`mmpeft.methods.render_support_table()`); a test keeps it in sync. "
             "`method` is what a recipe's `method.name` takes; 4-bit and 8-bit mean training on a bitsandbytes-"
             "quantized backbone (CUDA; on CPU only for checking).", "",
             "| method | setting | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for (name, setting), cells in cuda.items():
        lines.append(f"| {name} | {setting} | " + " | ".join("yes" if cells[c] else "no" for c in COLUMNS) + " |")
    differences = [f"{name}{f' ({setting})' if setting else ''} at {column}"
                   for (name, setting), cells in cuda.items() for column in COLUMNS
                   if cells[column] and not cpu[(name, setting)][column]]
    if differences:
        lines += ["", "Refused on CPU (the bitsandbytes CPU backend lacks it): " + "; ".join(differences) + "."]
    return "\n".join(lines) + "\n"


def replace_section(readme: str) -> str:
    """README text with the table between the markers replaced (markers appended at the end when absent)."""
    start, end = MARKERS
    table = render_support_table()
    if start not in readme or end not in readme:
        return readme.rstrip("\n") + f"\n\n{start}\n{table}{end}\n"
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}{end}{tail}"


def readme_section(readme: str) -> str | None:
    """The text between the markers, or None when they are missing."""
    start, end = MARKERS
    if start not in readme or end not in readme:
        return None
    return readme.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def main(argv: list[str] | None = None) -> None:
    """Rewrite the table in README.md (or the given files) in place, touching nothing else.

    `python -c "from mmpeft.methods import support; support.main()"` after adding a method or a family.
    """
    paths = (argv if argv is not None else sys.argv[1:]) or ["README.md"]
    for path in map(Path, paths):
        path.write_text(replace_section(path.read_text()))


if __name__ == "__main__":
    main()
