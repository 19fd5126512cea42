"""The layers of the code stay layers: the ground (the pipeline file model and the errors) imports nothing of the
project above it, and no library module imports the command line. Read from the source with `ast` (nothing is
imported or run), every import counted, those inside functions too: a lazy import is a dependency all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("cdc", "producers", "consumers", "schemas", "infra")
GROUND = {"cdc.config", "cdc.errors"}
COMMAND_LINE = {"cdc.cli", "cdc.cli.main", "cdc.cli.lag", "cdc.cli.demo"}
LIBRARY = ("producers", "consumers", "schemas", "infra")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "target" not in path.relative_to(ROOT).parts:  # infra/target: downloaded artifacts, not ours
                modules[module_name(path)] = path
    return modules


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports, as absolute names; `from a import b` counts as `a` and `a.b` (b may be a
    module: `from cdc import cli`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the module's own package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: {m for m in imports_of(path, name) if m in modules} for name, path in modules.items()}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    # The scan found the code (a test reading no file would pass for nothing).
    assert GROUND | COMMAND_LINE | {"consumers.apply.supervisor", "producers.capture", "schemas.codec",
                                    "infra.stack"} <= set(modules)
    return project_imports(modules)


def test_the_ground_imports_nothing_above_it(graph):
    above = {name: sorted(imported - GROUND) for name, imported in graph.items() if name in GROUND}
    assert above == {name: [] for name in GROUND}, (
        "cdc/config.py and cdc/errors.py are imported by every layer; importing the project from them makes cycles "
        f"and drags the layers above into everything: {above}")


def test_no_library_module_imports_the_command_line(graph):
    library = {name: imported for name, imported in graph.items() if name.split(".")[0] in LIBRARY}
    assert len(library) > 20  # the library was scanned
    offenders = {name: sorted(imported & COMMAND_LINE) for name, imported in library.items() if imported & COMMAND_LINE}
    assert offenders == {}, (
        "library modules (producers/, consumers/, schemas/, infra/) must not import the command line (cdc/cli/); "
        f"pass what they need as arguments instead: {offenders}")


def test_the_scan_sees_lazy_relative_and_from_imports(tmp_path):
    """The reader itself: imports inside functions, `from pkg import module` and relative imports are all seen."""
    source = tmp_path / "mod.py"
    source.write_text("import os\n"
                      "def f():\n    from cdc import cli\n    from . import sibling\n    from ..up import thing\n")
    found = imports_of(source, "consumers.apply.mod")
    assert {"os", "cdc", "cdc.cli", "consumers.apply", "consumers.apply.sibling", "consumers.up",
            "consumers.up.thing"} <= found


def test_applying_changes_knows_nothing_of_what_is_built_on_it(graph):
    """consumers/apply/ is the layer the others stand on: lag reads its tables, operations (replay, verify, backups)
    and the products (sync, sites) drive it; it imports none of them, and lag and operations import no product."""
    above = {"consumers.apply": ("consumers.lag", "consumers.ops", "consumers.sync", "consumers.sites"),
             "consumers.lag": ("consumers.ops", "consumers.sync", "consumers.sites"),
             "consumers.ops": ("consumers.lag", "consumers.sync", "consumers.sites")}
    found = {layer: 0 for layer in above}
    offenders = []
    for name, imported in graph.items():
        for layer, forbidden in above.items():
            if name == layer or name.startswith(layer + "."):
                found[layer] += 1
                offenders += [f"{name} imports {m}" for m in sorted(imported)
                              if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert all(found.values()), found  # every layer was scanned
    assert offenders == [], offenders
