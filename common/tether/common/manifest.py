"""Bundle manifests: what a task version is made of, and its content address.

A manifest lists every file of a task directory with its sha256 and size, the
entrypoint, and what the task needs from the device's engines. Its digest is
the sha256 of its *canonical* JSON bytes (sorted keys, no whitespace, UTF-8),
so the same content always has the same address on every machine.

Pure: no I/O beyond the explicit `hash_directory` walk, no network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from tether.common import errors
from tether.spec import jsontext

SCHEMA_VERSION = 1
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
ENGINES = frozenset({"mnn", "onnxruntime"})
# Bounds on what a manifest may claim; anything beyond is refused before use.
MAX_FILES = 10_000
MAX_FILE_SIZE = 2 * 1024**3
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_PATH_LEN = 512
# Wire contract: one PullBlobs request names at most this many blobs (a larger set takes several calls).
MAX_BLOBS_PER_PULL = 1024
IGNORED_NAMES = frozenset({"__pycache__", ".git", ".DS_Store", "mltask.yaml", ".tether"})
# Names the agent keeps for its own bookkeeping: no bundle path may have a component starting with this
# (compared case-insensitively, as on the filesystems devices use), at build, at upload and on the device.
RESERVED_PREFIX = ".tether"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: pathlib.Path, *, chunk_size: int = 1 << 20) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def check_digest(value: str, *, field: str = "digest") -> str:
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise errors.InvalidManifest(f"{field}: {errors.excerpt(value)} is not of the form sha256:<64 hex digits>")
    return value


def check_relative_path(value: str, *, field: str = "path") -> str:
    """A manifest path must stay inside the install directory."""
    if not isinstance(value, str) or not value or len(value) > MAX_PATH_LEN:
        raise errors.InvalidManifest(f"{field}: must be a non-empty string of at most {MAX_PATH_LEN} chars")
    p = pathlib.PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or "\\" in value or "\x00" in value or str(p) != value:
        raise errors.InvalidManifest(
            f"{field}: {errors.excerpt(value)} must be a normalised relative path inside the bundle"
        )
    return value


def path_key(path: str) -> tuple[str, ...]:
    """The components of `path` as a device filesystem may compare them.

    Case-insensitive (APFS, NTFS, FAT, many Android volumes), normalisation-insensitive
    (APFS compares NFC and NFD alike), and blind to trailing dots and spaces (NTFS/FAT strip them):
    two paths with the same key cannot both exist on every device.
    """
    return tuple(
        unicodedata.normalize("NFC", unicodedata.normalize("NFC", part).casefold()).rstrip(". ")
        for part in path.split("/")
    )


def check_paths(paths: Iterable[str], *, field: str = "files") -> None:
    """Refuse a set of bundle paths that cannot all be laid out on a device's filesystem.

    A reserved name (`RESERVED_PREFIX`), two paths that are one on a case- or normalisation-
    insensitive filesystem, and a path that is a file and also a directory of another
    (`a` and `a/b`, in any case) are refused, naming both paths. Pure; O(n) in the paths.
    """
    files: dict[tuple[str, ...], tuple[int, str]] = {}
    dirs: dict[tuple[str, ...], tuple[int, str]] = {}
    for i, path in enumerate(paths):
        key = path_key(path)
        if any(part.startswith(RESERVED_PREFIX) for part in key):
            raise errors.InvalidManifest(
                f"{field}[{i}].path: {_short(path)} uses a name reserved for the agent (a component starting with"
                f" {errors.excerpt(RESERVED_PREFIX)}, in any case)"
            )
        if key in files:
            j, other = files[key]
            raise errors.InvalidManifest(
                f"{field}[{i}].path: {_short(path)} and {field}[{j}].path ({_short(other)}) are the same file on a"
                " case- or normalisation-insensitive filesystem"
            )
        if key in dirs:
            j, other = dirs[key]
            raise errors.InvalidManifest(
                f"{field}[{i}].path: {_short(path)} is a file but {field}[{j}].path ({_short(other)}) needs it to be"
                " a directory"
            )
        for n in range(1, len(key)):
            prefix = key[:n]
            if prefix in files:
                j, other = files[prefix]
                raise errors.InvalidManifest(
                    f"{field}[{i}].path: {_short(path)} needs a directory where {field}[{j}].path ({_short(other)})"
                    " is a file"
                )
            dirs.setdefault(prefix, (i, path))
        files[key] = (i, path)


def _short(value: str) -> str:
    return errors.excerpt(value, limit=80)


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclasses.dataclass(frozen=True)
class EngineNeeds:
    """Which engine runs the model and which bundle file holds it."""

    engine: str  # "mnn" | "onnxruntime"
    model: str  # path of the model file inside the bundle
    inputs: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "model": self.model,
            "inputs": {k: list(v) for k, v in sorted(self.inputs.items())},
        }


ISOLATIONS = ("warm", "fresh")
MAX_CONCURRENCY = 16


@dataclasses.dataclass(frozen=True)
class RuntimeNeeds:
    """How the agent runs the task (`bundle.yaml` `runtime:`; docs/task-api.md, "Isolation and limits").

    `isolation`: `warm` (default: a resident worker forked from the agent's
    zygote, bundle imported and models loaded between runs) or `fresh` (a new
    interpreter per run). `concurrency`: how many runs of this task (from
    different triggers) may overlap, 1 (default: serialized) to 16. The
    manifest carries the field only when it differs from the default, so the
    digests of bundles that do not set it are unchanged.
    """

    isolation: str = "warm"
    concurrency: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"isolation": self.isolation, "concurrency": self.concurrency}

    @classmethod
    def from_json(cls, doc: Any, *, field: str = "runtime") -> RuntimeNeeds:
        if not isinstance(doc, dict):
            raise errors.InvalidManifest(f"{field}: must be a mapping with isolation and/or concurrency")
        unknown = set(doc) - {"isolation", "concurrency"}
        if unknown:
            raise errors.InvalidManifest(
                f"{field}: unknown fields {sorted(unknown)}; allowed are concurrency, isolation"
            )
        isolation = doc.get("isolation", "warm")
        if isolation not in ISOLATIONS:
            raise errors.InvalidManifest(f"{field}.isolation: {errors.excerpt(isolation)} not in {list(ISOLATIONS)}")
        concurrency = doc.get("concurrency", 1)
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or not 1 <= concurrency <= MAX_CONCURRENCY:
            raise errors.InvalidManifest(
                f"{field}.concurrency: must be an integer in [1, {MAX_CONCURRENCY}], got {errors.excerpt(concurrency)}"
            )
        return cls(isolation=isolation, concurrency=concurrency)


@dataclasses.dataclass(frozen=True)
class Manifest:
    name: str
    entrypoint: str
    files: tuple[FileEntry, ...]
    engines: tuple[EngineNeeds, ...] = ()
    schema: int = SCHEMA_VERSION
    runtime: RuntimeNeeds = RuntimeNeeds()

    # ------------------------------------------------------------ encoding
    def to_json(self) -> dict[str, Any]:
        doc = {
            "schema": self.schema,
            "name": self.name,
            "entrypoint": self.entrypoint,
            "files": [f.to_json() for f in self.files],
            "engines": [e.to_json() for e in self.engines],
        }
        if self.runtime != RuntimeNeeds():
            doc["runtime"] = self.runtime.to_json()
        return doc

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def digest(self) -> str:
        return sha256_digest(self.canonical_bytes())

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def blob_digests(self) -> list[str]:
        """Distinct blobs, in manifest order (two files with equal content share one)."""
        return list(dict.fromkeys(f.sha256 for f in self.files))

    # ------------------------------------------------------------ decoding
    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise errors.InvalidManifest(f"manifest is {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES}")
        try:
            doc = jsontext.loads(data.decode("utf-8"))
        except ValueError as e:  # not UTF-8, not JSON, nested too deeply, an integer of over 4300 digits
            raise errors.InvalidManifest(
                f"manifest is not valid UTF-8 JSON: {errors.excerpt(str(e), limit=200)}"
            ) from None
        manifest = cls.from_json(doc)
        if manifest.canonical_bytes() != data:
            raise errors.InvalidManifest("manifest bytes are not in canonical form")
        return manifest

    @classmethod
    def from_json(cls, doc: Any) -> Manifest:
        if not isinstance(doc, dict):
            raise errors.InvalidManifest("manifest must be a JSON object")
        unknown = set(doc) - {"schema", "name", "entrypoint", "files", "engines", "runtime"}
        if unknown:
            raise errors.InvalidManifest(f"manifest has unknown fields: {sorted(unknown)}")
        if doc.get("schema") != SCHEMA_VERSION:
            raise errors.InvalidManifest(f"schema: expected {SCHEMA_VERSION}, got {errors.excerpt(doc.get('schema'))}")
        name = doc.get("name")
        if not isinstance(name, str) or not re.match(r"^[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?$", name):
            raise errors.InvalidManifest(f"name: {errors.excerpt(name)} must be a lowercase DNS-like name")
        raw_files = doc.get("files")
        if not isinstance(raw_files, list) or not raw_files:
            raise errors.InvalidManifest("files: must be a non-empty list")
        if len(raw_files) > MAX_FILES:
            raise errors.InvalidManifest(f"files: {len(raw_files)} entries; the limit is {MAX_FILES}")
        files: list[FileEntry] = []
        for i, f in enumerate(raw_files):
            if not isinstance(f, dict) or set(f) != {"path", "sha256", "size"}:
                raise errors.InvalidManifest(f"files[{i}]: must have exactly path, sha256, size")
            size = f["size"]
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
                raise errors.InvalidManifest(f"files[{i}].size: must be an integer in [0, {MAX_FILE_SIZE}]")
            files.append(
                FileEntry(
                    path=check_relative_path(f["path"], field=f"files[{i}].path"),
                    sha256=check_digest(f["sha256"], field=f"files[{i}].sha256"),
                    size=size,
                )
            )
        paths = [f.path for f in files]
        if paths != sorted(set(paths)):
            raise errors.InvalidManifest("files: paths must be unique and sorted")
        check_paths(paths)
        entrypoint = check_relative_path(doc.get("entrypoint", ""), field="entrypoint")
        if entrypoint not in paths:
            raise errors.InvalidManifest(f"entrypoint: {errors.excerpt(entrypoint)} is not one of the bundle's files")
        engines: list[EngineNeeds] = []
        raw_engines = doc.get("engines") or []
        if not isinstance(raw_engines, list):
            raise errors.InvalidManifest("engines: must be a list")
        for i, e in enumerate(raw_engines):
            if not isinstance(e, dict) or set(e) - {"engine", "model", "inputs"}:
                raise errors.InvalidManifest(f"engines[{i}]: must have engine, model and optional inputs")
            if not isinstance(e.get("engine"), str) or e["engine"] not in ENGINES:
                raise errors.InvalidManifest(
                    f"engines[{i}].engine: {errors.excerpt(e.get('engine'))} not in {sorted(ENGINES)}"
                )
            model = check_relative_path(e.get("model", ""), field=f"engines[{i}].model")
            if model not in paths:
                raise errors.InvalidManifest(
                    f"engines[{i}].model: {errors.excerpt(model)} is not one of the bundle's files"
                )
            inputs = e.get("inputs") or {}
            if not isinstance(inputs, dict) or not all(
                isinstance(v, list) and all(isinstance(d, int) for d in v) for v in inputs.values()
            ):
                raise errors.InvalidManifest(f"engines[{i}].inputs: must map names to integer shapes")
            engines.append(EngineNeeds(e["engine"], model, {k: tuple(v) for k, v in inputs.items()}))
        runtime = RuntimeNeeds.from_json(doc["runtime"]) if "runtime" in doc else RuntimeNeeds()
        return cls(name=name, entrypoint=entrypoint, files=tuple(files), engines=tuple(engines), runtime=runtime)


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def iter_bundle_files(root: pathlib.Path) -> Iterable[pathlib.Path]:
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part in IGNORED_NAMES or part.endswith(".pyc") for part in rel.parts):
            continue
        if p.is_symlink():
            raise errors.InvalidManifest(f"{rel}: symlinks are not allowed in a bundle")
        if p.is_file():
            yield p


def hash_directory(
    root: pathlib.Path,
    *,
    name: str,
    entrypoint: str,
    engines: Iterable[EngineNeeds] = (),
    runtime: RuntimeNeeds = RuntimeNeeds(),
) -> Manifest:
    """Hash every file under `root` and build (and validate) its manifest."""
    files = []
    for p in iter_bundle_files(root):
        digest, size = file_digest(p)
        files.append(FileEntry(path=p.relative_to(root).as_posix(), sha256=digest, size=size))
    manifest = Manifest(name=name, entrypoint=entrypoint, files=tuple(files), engines=tuple(engines), runtime=runtime)
    # Round-trip through the decoder: a built manifest obeys the same rules as a received one.
    return Manifest.from_bytes(manifest.canonical_bytes())
