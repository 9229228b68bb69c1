"""The layout, checked: no import loops, pure cores free of I/O libraries, rooms of bounded size.

import-linter (`lint-imports`, contracts in pyproject.toml) checks the layers between source roots in CI;
this checks inside them, on the same import graph (grimp), so the suite fails too when a loop or an I/O
import creeps in. `tether` is a namespace package, so the graph is built from its portions by name: grimp
finds no modules under the bare namespace, and a check over an empty graph would pass whatever the code.
"""

from __future__ import annotations

import ast
import pathlib
import tomllib

import pytest

grimp = pytest.importorskip("grimp")

REPO = pathlib.Path(__file__).resolve().parents[1]
PORTIONS = (
    "tether.proto",
    "tether.spec",
    "tether.common",
    "tether.agent",
    "tether.controller",
    "tether.operator",
    "tether.dashboard",
    "tether.devtools",
    "tether.cli",
)
SOURCE_ROOTS = ("protos", "common", "agent", "controller", "operator", "dashboard", "devtools", "cli")
IO_PACKAGES = ("grpc", "psycopg", "psycopg_pool", "celery", "kopf", "MNN", "onnxruntime")
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400


def _pure_modules() -> list[str]:
    """The modules pyproject.toml's import-linter contract declares pure (one list, not two)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    for contract in config["tool"]["importlinter"]["contracts"]:
        if contract["type"] == "forbidden" and contract["name"].startswith("Pure cores"):
            return list(contract["source_modules"])
    raise AssertionError("pyproject.toml declares no pure-core contract")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*PORTIONS, include_external_packages=True)


def _sources() -> list[pathlib.Path]:
    return sorted(
        p
        for root in SOURCE_ROOTS
        for p in (REPO / root).rglob("*.py")
        if "_pb2" not in p.name and "migrations" not in p.parts
    )


def test_the_graph_holds_every_component(graph) -> None:
    for portion in PORTIONS:
        assert any(m.startswith(portion + ".") for m in graph.modules), portion
    assert len([m for m in graph.modules if m.startswith("tether.")]) > 100


@pytest.mark.parametrize("portion", PORTIONS[1:])
def test_no_import_loops_between_modules(graph, portion: str) -> None:
    loops = []
    for module in sorted(m for m in graph.modules if m.startswith(portion + ".")):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith(portion + ".") and graph.find_shortest_chain(importer=imported, imported=module):
                loops.append((module, imported))
    assert loops == []


def test_a_loop_is_found_when_there_is_one() -> None:
    g = grimp.ImportGraph()
    for m in ("pkg", "pkg.a", "pkg.b"):
        g.add_module(m)
    g.add_import(importer="pkg.a", imported="pkg.b")
    g.add_import(importer="pkg.b", imported="pkg.a")
    assert g.find_shortest_chain(importer="pkg.b", imported="pkg.a") == ("pkg.b", "pkg.a")


@pytest.mark.parametrize("module", _pure_modules())
def test_pure_modules_reach_no_io_library(graph, module: str) -> None:
    assert module in graph.modules, module
    for package in IO_PACKAGES:
        if package in graph.modules:
            assert graph.find_shortest_chain(importer=module, imported=package) is None, (module, package)


def test_modules_and_classes_stay_small() -> None:
    too_long, big_classes = {}, []
    for p in _sources():
        text = p.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            too_long[str(p.relative_to(REPO))] = n
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and (node.end_lineno or 0) - node.lineno + 1 > MAX_CLASS_LINES:
                big_classes.append(f"{p.relative_to(REPO)}:{node.name}")
    assert too_long == {}
    assert big_classes == []


def test_no_module_name_is_shared_across_components() -> None:
    """`store.py` three times, `worker.py` twice...: a name says which room it is in, once.

    The CLI is the exception by design: each of its modules is named for the command it implements
    (`tether certs` is `tether.cli.certs`, over `tether.common.certs`).
    """
    seen: dict[str, list[str]] = {}
    for p in _sources():
        if p.name in ("__init__.py", "__main__.py") or p.is_relative_to(REPO / "cli"):
            continue
        seen.setdefault(p.stem, []).append(str(p.relative_to(REPO)))
    shared = {name: paths for name, paths in seen.items() if len({path.split("/")[0] for path in paths}) > 1}
    assert shared == {}
