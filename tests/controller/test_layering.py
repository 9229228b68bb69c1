"""The controller's rooms, checked: no import loops, pure modules free of I/O libraries, bounded sizes.

import-linter's contracts (pyproject.toml) check the layers between components; this checks inside the
controller, with the same import graph (grimp), so a loop or an I/O import in a pure module fails here.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

grimp = pytest.importorskip("grimp")

import tether.controller.server  # noqa: E402,F401  (the controller's modules import)

ROOT = pathlib.Path(__file__).resolve().parents[2] / "controller" / "tether" / "controller"
PURE = (
    "tether.controller.targeting",
    "tether.controller.cohorts",
    "tether.controller.rollouts",
    "tether.controller.stage_health",
    "tether.controller.releases",
    "tether.controller.devices",
    "tether.controller.uploads",
    "tether.controller.serving",
    "tether.controller.deliveries",
    "tether.controller.wire",
    "tether.controller.storage.contracts",
)
IO_PACKAGES = ("grpc", "psycopg", "psycopg_pool", "celery", "kopf", "MNN", "onnxruntime")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("tether", include_external_packages=True)


def _controller_modules(graph) -> list[str]:
    return sorted(m for m in graph.modules if m.startswith("tether.controller."))


def test_no_import_loops_inside_the_controller(graph) -> None:
    loops = []
    for module in _controller_modules(graph):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("tether.controller.") and graph.find_shortest_chain(
                importer=imported, imported=module
            ):
                loops.append((module, imported))
    assert loops == []


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io_library(graph, module: str) -> None:
    for package in IO_PACKAGES:
        if package in graph.modules:
            assert graph.find_shortest_chain(importer=module, imported=package) is None, (module, package)


def test_rooms_stay_small_and_no_store_module_remains() -> None:
    sources = sorted(p for p in ROOT.rglob("*.py") if "migrations" not in p.parts)
    assert not [p for p in sources if p.name == "store.py"]
    too_long = {p.name: n for p in sources if (n := len(p.read_text().splitlines())) > 600}
    assert too_long == {}
    big_classes = []
    for p in sources:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and (node.end_lineno or 0) - node.lineno + 1 > 400:
                big_classes.append(f"{p.name}:{node.name}")
    assert big_classes == []
