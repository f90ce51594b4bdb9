"""The package's floors: no module imports one on a higher floor (docs/architecture.md, "Layers").

Every import is read from the source with `ast`, function-local ones included, so an import hidden
inside a function to dodge a cycle is caught as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

PERL = Path(__file__).resolve().parents[1] / "perl"

# lowest first; a module may import from its own floor and the floors below it
FLOORS = [
    ("foundation", ["perl.fileio", "perl.cli_support"]),
    ("config", ["perl.config"]),
    (
        "utilities",
        [
            "perl.schema",
            "perl.ncfiles",
            "perl.rundir",
            "perl.progress",
            "perl.runcard",
            "perl.preflight",
            "perl.testing",
            "perl.stats",
        ],
    ),
    ("data", ["perl.data"]),
    ("models", ["perl.models"]),
    ("adapters", ["perl.adapters"]),
    ("trackers", ["perl.trackers"]),
    ("run", ["perl.run", "perl.run_files"]),
    ("viz", ["perl.viz"]),
    (
        "commands",
        [
            "perl.train",
            "perl.evaluate",
            "perl.build_model",
            "perl.sweep",
            "perl.sweep_spec",
            "perl.sweep_summary",
            "perl.sweep_compare",
            "perl.questions",
            "perl.notebook_utils",
            "perl.synthetic",
        ],
    ),
    ("cli", ["perl.cli", "perl.__main__"]),
]
# note: the seed's `python -m perl.trackers.test_integration` (README) is a test that trains; it sits
# beside the trackers for that command only and is not library code.
NOT_LIBRARY = {"perl.trackers.test_integration"}


def floor_of(module: str) -> int | None:
    best = None
    for i, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    return None if best is None else best[0]


def module_name(path: Path, root: Path = PERL) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path = PERL) -> list[tuple[int, str]]:
    """(line, module) of every perl import in ``path``; ``from x import y`` yields x.y (y may be a module)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return [(line, m) for line, m in out if m.startswith("perl.")]


def violations(root: Path = PERL) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        low = floor_of(name)
        if name in NOT_LIBRARY or low is None:
            continue
        for line, target in imported(path, root):
            high = floor_of(target)
            if high is not None and high > low:
                found.append(
                    f"{path.relative_to(root.parent)}:{line}: {name} ({FLOORS[low][0]}) imports "
                    f"{target} ({FLOORS[high][0]})"
                )
    return found


def test_every_module_has_a_floor():
    unplaced = [
        module_name(p) for p in PERL.rglob("*.py") if floor_of(module_name(p)) is None and module_name(p) != "perl"
    ]
    assert not unplaced, f"add these modules to a floor in FLOORS and docs/architecture.md: {unplaced}"


def test_no_import_goes_up_a_floor():
    found = violations()
    assert not found, "\n".join(found)


def test_the_checker_sees_an_upward_import_inside_a_function(tmp_path):
    # note: a checker that never fires would pass the test above for any tree
    fake = tmp_path / "perl" / "trackers"
    fake.mkdir(parents=True)
    (fake / "thing.py").write_text("def f():\n    from perl.viz.plots import x\n    from ..run import open_run\n")
    found = violations(tmp_path / "perl")
    assert len(found) == 2 and "perl.viz.plots.x (viz)" in found[0] and "perl.run.open_run (run)" in found[1]


def test_the_architecture_page_lists_the_same_floors():
    # note: docs/architecture.md's "Layers" table is what a contributor reads; it must say what this test enforces
    import re

    text = (PERL.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    documented = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            names = re.findall(r"`([^`]+)`", cells[1].split("(")[0])  # what follows "(" is a comment
            documented.append((cells[0].split(" (")[0], ["perl." + m.rstrip("/") for m in names]))
    assert documented == FLOORS
