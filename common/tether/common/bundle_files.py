"""Read a bundle directory's `bundle.yaml` and build its manifest.

`bundle.yaml` (see docs/internals.md) names the task, its entrypoint and what
it needs from the device's engines. Every file under the directory (except
`manifest.IGNORED_NAMES`) becomes part of the bundle, `bundle.yaml` included.
"""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

from tether.common import errors, manifest

SPEC_FILE = "bundle.yaml"
MAX_SPEC_BYTES = 64 * 1024
_SPEC_FIELDS = frozenset({"name", "entrypoint", "engines", "runtime"})
_ENGINE_FIELDS = frozenset({"engine", "model", "inputs"})


def load_bundle_spec(directory: str | pathlib.Path) -> tuple[str, str, tuple[manifest.EngineNeeds, ...]]:
    """Return (name, entrypoint, engines) from `<directory>/bundle.yaml`, validated."""
    root = pathlib.Path(directory)
    path = root / SPEC_FILE
    if not root.is_dir():
        raise errors.InvalidManifest(f"{root}: not a directory")
    if not path.is_file():
        raise errors.InvalidManifest(f"{path}: missing (a bundle directory needs a {SPEC_FILE})")
    raw = path.read_bytes()
    if len(raw) > MAX_SPEC_BYTES:
        raise errors.InvalidManifest(f"{path}: {len(raw)} bytes; the limit is {MAX_SPEC_BYTES}")
    try:
        doc: Any = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise errors.InvalidManifest(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise errors.InvalidManifest(f"{path}: must be a mapping")
    unknown = set(doc) - _SPEC_FIELDS
    if unknown:
        raise errors.InvalidManifest(f"{path}: unknown fields {sorted(unknown)}")
    name, entrypoint = doc.get("name"), doc.get("entrypoint")
    if not isinstance(name, str) or not name:
        raise errors.InvalidManifest(f"{path}: name: required string")
    if not isinstance(entrypoint, str) or not entrypoint:
        raise errors.InvalidManifest(f"{path}: entrypoint: required string")
    raw_engines = doc.get("engines") or []
    if not isinstance(raw_engines, list):
        raise errors.InvalidManifest(f"{path}: engines: must be a list")
    engines = []
    for i, need in enumerate(raw_engines):
        where = f"{path}: engines[{i}]"
        if not isinstance(need, dict) or set(need) - _ENGINE_FIELDS or not {"engine", "model"} <= set(need):
            raise errors.InvalidManifest(f"{where}: must have engine, model and optional inputs")
        if need["engine"] not in manifest.ENGINES:
            raise errors.InvalidManifest(f"{where}.engine: {need['engine']!r} not in {sorted(manifest.ENGINES)}")
        if not isinstance(need["model"], str):
            raise errors.InvalidManifest(f"{where}.model: must be a path inside the bundle")
        inputs = need.get("inputs") or {}
        if not isinstance(inputs, dict) or not all(
            isinstance(k, str)
            and isinstance(v, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
            for k, v in inputs.items()
        ):
            raise errors.InvalidManifest(f"{where}.inputs: must map input names to lists of non-negative ints")
        engines.append(manifest.EngineNeeds(need["engine"], need["model"], {k: tuple(v) for k, v in inputs.items()}))
    return name, entrypoint, tuple(engines)


def load_runtime_spec(directory: str | pathlib.Path) -> manifest.RuntimeNeeds:
    """`bundle.yaml`'s `runtime:` (isolation, concurrency); the default when it has none."""
    path = pathlib.Path(directory) / SPEC_FILE
    doc: Any = yaml.safe_load(path.read_bytes()[:MAX_SPEC_BYTES])  # load_bundle_spec checked size and form
    raw = doc.get("runtime") if isinstance(doc, dict) else None
    return manifest.RuntimeNeeds() if raw is None else manifest.RuntimeNeeds.from_json(raw, field=f"{path}: runtime")


def build_manifest(directory: str | pathlib.Path) -> manifest.Manifest:
    """Hash every file of a bundle directory into its (validated) manifest."""
    name, entrypoint, engines = load_bundle_spec(directory)
    return manifest.hash_directory(
        pathlib.Path(directory),
        name=name,
        entrypoint=entrypoint,
        engines=engines,
        runtime=load_runtime_spec(directory),
    )
