"""The device-side bundle store and the agent's durable state.

Layout of a state directory::

    state.json                     credential, installed versions, run records (atomic writes)
    blobs/sha256/<hex>             verified, read-only blobs, shared by every task and version
    blobs/partial/<hex>.part       interrupted downloads; a pull resumes from the file's size
    installs/<release>/<version>/  one installed bundle version (files hardlinked from blobs)
    installs/<release>/current     the active version number (atomic pointer file)
    installs/<release>/.staging-*  an install being assembled (removed by `gc`)
    taskstate/<release>.json       `ctx.state` of a task, kept between runs
    results/<key>.pb               a finished run's upload, kept until the controller acknowledged it

`<release>` is the release name percent-encoded (`ns%2Fname`), so distinct
releases never share a directory.

Guarantees: a blob appears under `blobs/sha256/` only after its sha256 was
checked; an install directory appears (by one `rename`) only complete and
verified; `current` moves by one `rename`; the previous version is kept for
rollback; a crash at any point leaves either the old or the new state.
Blocking file I/O: call from a worker thread in async code.

Disk budget (`tether agent run --disk-budget`, `make_room`): what counts is
`blobs/` (verified and partial) and `installs/`, by apparent file size, each
file once however many hard links it has (an install's files are links to its
blobs, so a version costs its blobs plus its manifest copy). Before a pull the
agent computes what the new version still needs (declared sizes of the blobs it
lacks, less their partial bytes) and, if that does not fit, frees space in
this order: unreferenced blobs, partials and leftovers; installed versions
that are neither running nor a rollback target; rollback targets, oldest
first. The running version of every release is never removed. If the version
still does not fit, nothing is removed and `DiskBudgetExceeded` says why.
A download never grows past the size its manifest declares (`BlobWriter`), so
a lying server cannot push the store over the budget. Not counted, and bounded
on their own: `state.json` and task state (`MAX_STATE_BYTES` each), results
waiting for upload (pruned run records), `events.db` (count and age retention).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import stat
import tempfile
import urllib.parse
from collections.abc import Collection, Iterable, Iterator, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, BinaryIO

from tether.common import errors, manifest

STATE_VERSION = 1
MANIFEST_FILE = ".tether-manifest.json"
MAX_RELEASE_LEN = 253
MAX_STATE_BYTES = 1024 * 1024
# Bounded by default: a device's disk is small and shared with its owner's data. Bundles of on-device
# models are megabytes to a few hundred; 1 GiB holds a few of them plus a rollback copy each.
DEFAULT_DISK_BUDGET = 1024**3
ENV_DISK_BUDGET = "TETHER_AGENT_DISK_BUDGET"


# ---------------------------------------------------------------- atomic files


def fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old or the new content, never a mix (tmp + fsync + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: pathlib.Path, doc: Any) -> None:
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))


def release_dirname(release: str) -> str:
    if not isinstance(release, str) or not release or len(release) > MAX_RELEASE_LEN or "\x00" in release:
        raise errors.InvalidArgument(f"release: {release!r} must be a non-empty name of at most {MAX_RELEASE_LEN}")
    name = urllib.parse.quote(release, safe="")
    if name.startswith("."):  # ".", "..", and the store's own ".staging-*" / ".removing-*" names
        raise errors.InvalidArgument(f"release: {release!r} is not a valid name")
    return name


def _hex(digest: str) -> str:
    return manifest.check_digest(digest).split(":", 1)[1]


# ---------------------------------------------------------------- agent state


@dataclasses.dataclass
class RunRecord:
    """One run of a task. Written before the task runs, so a restart reuses `key` for the upload."""

    key: str
    release: str
    version: int
    trigger: str
    status: str  # "running" | "uploading" | "uploaded" | "failed"
    started_at: float
    finished_at: float = 0.0
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in fields})


@dataclasses.dataclass
class InstalledTask:
    release: str
    version: int
    manifest_digest: str
    # The version's policy as announced (DesiredTask), so a restarted agent runs it the same way
    # before the stream's Sync arrives.
    trigger_json: str = ""
    resources_json: str = ""

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> InstalledTask:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in fields})


@dataclasses.dataclass
class AgentState:
    device_id: str = ""
    credential: str = ""
    installed: dict[str, InstalledTask] = dataclasses.field(default_factory=dict)
    # release -> {"version": int, "digest": str, "reason": str}: versions refused; not retried.
    refused: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    runs: dict[str, RunRecord] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": STATE_VERSION,
            "device_id": self.device_id,
            "credential": self.credential,
            "installed": {k: dataclasses.asdict(v) for k, v in sorted(self.installed.items())},
            "refused": dict(sorted(self.refused.items())),
            "runs": {k: v.to_json() for k, v in self.runs.items()},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AgentState:
        return cls(
            device_id=str(doc.get("device_id", "")),
            credential=str(doc.get("credential", "")),
            installed={k: InstalledTask.from_json(v) for k, v in (doc.get("installed") or {}).items()},
            refused=dict(doc.get("refused") or {}),
            runs={k: RunRecord.from_json(v) for k, v in (doc.get("runs") or {}).items()},
        )

    def runs_of(self, release: str, version: int | None = None) -> list[RunRecord]:
        return [r for r in self.runs.values() if r.release == release and (version is None or r.version == version)]

    def prune_runs(self, *, keep_per_release: int = 20) -> list[str]:
        """Forget old finished runs; never a run whose upload is still pending. Returns removed keys."""
        removed = []
        by_release: dict[str, list[RunRecord]] = {}
        for r in self.runs.values():
            by_release.setdefault(r.release, []).append(r)
        for runs in by_release.values():
            done = sorted((r for r in runs if r.status in {"uploaded", "failed"}), key=lambda r: r.started_at)
            for r in done[: max(0, len(done) - keep_per_release)]:
                del self.runs[r.key]
                removed.append(r.key)
        return removed


class StateFile:
    """`state.json`, read once and rewritten atomically on every change."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def load(self) -> AgentState:
        if not self.path.exists():
            return AgentState()
        raw = self.path.read_bytes()
        if len(raw) > MAX_STATE_BYTES * 16:
            raise errors.FailedPrecondition(f"{self.path}: unreasonably large ({len(raw)} bytes)")
        doc = json.loads(raw)
        if doc.get("schema") != STATE_VERSION:
            raise errors.FailedPrecondition(f"{self.path}: unknown schema {doc.get('schema')!r}")
        return AgentState.from_json(doc)

    def save(self, state: AgentState) -> None:
        atomic_write_json(self.path, state.to_json())
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)  # holds the device credential


# ---------------------------------------------------------------- blobs and installs


class BlobWriter:
    """Appends a download to `<hex>.part`; `commit` verifies the whole file and moves it into the cache."""

    def __init__(self, store: BundleStore, digest: str, *, expected_size: int | None) -> None:
        self.store = store
        self.digest = digest
        self.expected_size = expected_size
        self.part = store.partial_path(digest)
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(self.part, "ab")  # noqa: SIM115 - closed in commit/close
        self.offset = self._file.tell()
        if expected_size is not None and self.offset > expected_size:
            # A partial longer than the blob can only be garbage: start again.
            self._file.truncate(0)
            self._file.seek(0)
            self.offset = 0

    def write(self, data: bytes, *, offset: int | None = None) -> None:
        if offset is not None and offset != self.offset:
            raise errors.InvalidArgument(f"blob {self.digest}: chunk at offset {offset}, expected {self.offset}")
        if self.expected_size is not None and self.offset + len(data) > self.expected_size:
            raise errors.DigestMismatch(
                f"blob {self.digest}: more than the {self.expected_size} bytes the manifest announced"
            )
        self._file.write(data)
        self.offset += len(data)

    def close(self) -> None:
        """Keep what was written for a later resume."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def commit(self) -> pathlib.Path:
        self.close()
        try:
            actual, size = manifest.file_digest(self.part)
            if actual != self.digest or (self.expected_size is not None and size != self.expected_size):
                raise errors.DigestMismatch(
                    f"blob {self.digest}: received {size} bytes hashing to {actual}"
                    + (f" (expected {self.expected_size} bytes)" if self.expected_size is not None else "")
                )
            final = self.store.blob_path(self.digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self.part, 0o444)
            os.replace(self.part, final)
            fsync_dir(final.parent)
            return final
        except BaseException:
            self.part.unlink(missing_ok=True)  # bad content must not be resumed from
            raise

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BundleStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = pathlib.Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.partials = self.root / "blobs" / "partial"
        self.installs = self.root / "installs"
        self.results = self.root / "results"
        self.taskstate = self.root / "taskstate"
        for d in (self.blobs, self.partials, self.installs, self.results, self.taskstate):
            d.mkdir(parents=True, exist_ok=True)
        self._links: bool | None = None  # hard links work here (installs cost no copies); probed once

    # ---------------------------------------------------------- blobs
    def blob_path(self, digest: str) -> pathlib.Path:
        return self.blobs / _hex(digest)

    def partial_path(self, digest: str) -> pathlib.Path:
        return self.partials / f"{_hex(digest)}.part"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def partial_size(self, digest: str) -> int:
        try:
            return self.partial_path(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def missing_blobs(self, m: manifest.Manifest) -> list[manifest.FileEntry]:
        """One entry per distinct blob of `m` not in the cache yet."""
        seen: set[str] = set()
        out = []
        for f in m.files:
            if f.sha256 not in seen and not self.has_blob(f.sha256):
                out.append(f)
            seen.add(f.sha256)
        return out

    def open_blob(self, digest: str, *, expected_size: int | None = None) -> BlobWriter:
        return BlobWriter(self, digest, expected_size=expected_size)

    def put_blob(self, digest: str, data: bytes) -> pathlib.Path:
        self.partial_path(digest).unlink(missing_ok=True)
        with self.open_blob(digest, expected_size=len(data)) as w:
            w.write(data)
            return w.commit()

    # ---------------------------------------------------------- installs
    def release_dir(self, release: str) -> pathlib.Path:
        return self.installs / release_dirname(release)

    def install_dir(self, release: str, version: int) -> pathlib.Path:
        return self.release_dir(release) / str(int(version))

    def current(self, release: str) -> int | None:
        try:
            return int((self.release_dir(release) / "current").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def current_dir(self, release: str) -> pathlib.Path | None:
        version = self.current(release)
        if version is None:
            return None
        path = self.install_dir(release, version)
        return path if path.is_dir() else None

    def versions(self, release: str) -> list[int]:
        d = self.release_dir(release)
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())

    def installed_manifest(self, release: str, version: int) -> manifest.Manifest:
        return manifest.Manifest.from_bytes((self.install_dir(release, version) / MANIFEST_FILE).read_bytes())

    def install(self, release: str, version: int, m: manifest.Manifest) -> pathlib.Path:
        """Assemble version `version` of `release` from cached blobs, then make it current.

        Every blob is re-hashed while it is linked in, so a corrupted cache is caught (the bad
        blob is dropped and DigestMismatch raised) and nothing is installed.
        """
        version = int(version)
        missing = self.missing_blobs(m)
        if missing:
            raise errors.FailedPrecondition(f"cannot install {release} v{version}: {len(missing)} blobs missing")
        rdir = self.release_dir(release)
        rdir.mkdir(parents=True, exist_ok=True)
        final = rdir / str(version)
        if final.is_dir() and not self._same_install(final, m):
            shutil.rmtree(final)
        if not final.is_dir():
            staging = pathlib.Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=rdir))
            try:
                verified: set[str] = set()
                for f in m.files:
                    blob = self.blob_path(f.sha256)
                    if f.sha256 not in verified:
                        actual, size = manifest.file_digest(blob)
                        if actual != f.sha256 or size != f.size:
                            blob.unlink(missing_ok=True)
                            raise errors.DigestMismatch(f"cached blob {f.sha256} for {f.path} is corrupt")
                        verified.add(f.sha256)
                    dest = staging / f.path
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(blob, dest)
                    except OSError:
                        shutil.copyfile(blob, dest)
                        os.chmod(dest, 0o444)
                (staging / MANIFEST_FILE).write_bytes(m.canonical_bytes())
                for d in sorted({p.parent for p in staging.rglob("*")}, key=lambda p: -len(p.parts)):
                    fsync_dir(d)
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_dir(rdir)
        atomic_write(rdir / "current", f"{version}\n".encode())
        self._prune_versions(release, keep={version, *self._previous(release, version)})
        return final

    @staticmethod
    def _same_install(path: pathlib.Path, m: manifest.Manifest) -> bool:
        try:
            return (path / MANIFEST_FILE).read_bytes() == m.canonical_bytes()
        except OSError:
            return False

    def _previous(self, release: str, version: int) -> list[int]:
        older = [v for v in self.versions(release) if v < version]
        return older[-1:]

    def _prune_versions(self, release: str, *, keep: Iterable[int]) -> None:
        keep = set(keep)
        for v in self.versions(release):
            if v not in keep:
                shutil.rmtree(self.install_dir(release, v), ignore_errors=True)

    def rollback(self, release: str) -> int | None:
        """Make the version before the current one current again (if it is still kept)."""
        current = self.current(release)
        if current is None:
            return None
        older = self._previous(release, current)
        if not older:
            return None
        atomic_write(self.release_dir(release) / "current", f"{older[0]}\n".encode())
        return older[0]

    def uninstall(self, release: str) -> None:
        rdir = self.release_dir(release)
        if rdir.exists():
            # Rename first so a crash midway never leaves a half-deleted install that looks valid.
            doomed = self.installs / f".removing-{rdir.name}-{os.getpid()}"
            os.rename(rdir, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        (self.taskstate / f"{release_dirname(release)}.json").unlink(missing_ok=True)

    def releases(self) -> list[str]:
        return sorted(
            urllib.parse.unquote(p.name) for p in self.installs.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    # ---------------------------------------------------------- task state and pending results
    def load_task_state(self, release: str) -> dict[str, Any]:
        path = self.taskstate / f"{release_dirname(release)}.json"
        try:
            doc = json.loads(path.read_bytes())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def save_task_state(self, release: str, state: dict[str, Any]) -> None:
        data = json.dumps(state, sort_keys=True, allow_nan=False).encode("utf-8")
        if len(data) > MAX_STATE_BYTES:
            raise errors.TooLarge(f"task state is {len(data)} bytes; the limit is {MAX_STATE_BYTES}")
        atomic_write(self.taskstate / f"{release_dirname(release)}.json", data)

    def result_path(self, key: str) -> pathlib.Path:
        return self.results / f"{urllib.parse.quote(key, safe='')}.pb"

    # ---------------------------------------------------------- garbage collection
    def referenced_blobs(self) -> set[str]:
        refs: set[str] = set()
        for release in self.releases():
            for v in self.versions(release):
                try:
                    refs.update(self.installed_manifest(release, v).blob_digests())
                except (OSError, errors.TetherError):
                    continue
        return refs

    def gc(self, *, keep: Iterable[str] = ()) -> list[str]:
        """Delete blobs no kept install references, partials not in `keep`, and leftover staging dirs.

        `keep`: digests in use by an install in progress. Returns the removed blob digests.
        """
        keep = set(keep)
        refs = self.referenced_blobs() | keep
        removed = []
        for p in self.blobs.iterdir():
            digest = f"sha256:{p.name}"
            if digest not in refs:
                p.unlink(missing_ok=True)
                removed.append(digest)
        for p in self.partials.iterdir():
            if f"sha256:{p.name.removesuffix('.part')}" not in keep:
                p.unlink(missing_ok=True)
        for p in self._leftovers():
            shutil.rmtree(p, ignore_errors=True)
        return sorted(removed)

    def _leftovers(self) -> Iterator[pathlib.Path]:
        for p in self.installs.iterdir():
            if p.name.startswith(".removing-"):
                yield p
            elif p.is_dir():
                yield from (s for s in p.iterdir() if s.name.startswith(".staging-"))

    # ---------------------------------------------------------- disk budget
    def snapshot(self) -> StoreSnapshot:
        """What the store holds and how big it is (see the module docstring for what counts)."""
        seen: set[tuple[int, int]] = set()

        def sized(path: pathlib.Path) -> int:
            try:
                st = path.lstat()
            except OSError:
                return 0
            if (st.st_dev, st.st_ino) in seen or not stat.S_ISREG(st.st_mode):  # counted already, or not a file
                return 0
            seen.add((st.st_dev, st.st_ino))
            return st.st_size

        def tree(root: pathlib.Path) -> int:
            total = 0
            for dirpath, _, names in os.walk(root):
                total += sum(sized(pathlib.Path(dirpath, n)) for n in names)
            return total

        blobs = {f"sha256:{p.name}": sized(p) for p in self.blobs.iterdir()}
        partials = {f"sha256:{p.name.removesuffix('.part')}": sized(p) for p in self.partials.iterdir()}
        installs: dict[tuple[str, int], InstallSize] = {}
        current: dict[str, int] = {}
        for release in self.releases():
            cur = self.current(release)
            if cur is not None:
                current[release] = cur
            try:
                versions = self.versions(release)
            except OSError:  # uninstalled meanwhile (`tether agent disk` reads a running agent's store)
                continue
            for v in versions:
                path = self.install_dir(release, v)
                try:
                    digests = frozenset(self.installed_manifest(release, v).blob_digests())
                except (OSError, errors.TetherError):
                    digests = frozenset()
                try:
                    mtime = path.stat().st_mtime
                except OSError:
                    mtime = 0.0
                installs[(release, v)] = InstallSize(digests=digests, own_bytes=tree(path), mtime=mtime)
        try:
            leftovers = sum(tree(p) for p in self._leftovers())
        except OSError:
            leftovers = 0
        return StoreSnapshot(blobs=blobs, partials=partials, installs=installs, current=current, leftovers=leftovers)

    def install_overhead(self, m: manifest.Manifest) -> int:
        """Bytes an install of `m` adds beyond its blobs: its manifest copy (and the files, where links fail)."""
        return len(m.canonical_bytes()) + (0 if self._hardlinks_work() else sum(f.size for f in m.files))

    def _hardlinks_work(self) -> bool:
        if self._links is None:
            fd, tmp = tempfile.mkstemp(prefix=".linktest-", dir=self.root)
            os.close(fd)
            try:
                os.link(tmp, f"{tmp}.link")
                os.unlink(f"{tmp}.link")
                self._links = True
            except OSError:
                self._links = False
            finally:
                os.unlink(tmp)
        return self._links

    def plan_room(
        self,
        release: str,
        version: int,
        m: manifest.Manifest,
        *,
        budget: int | None,
        keep: Collection[str] = (),
        reserved: Mapping[str, int] | None = None,
    ) -> RoomPlan:
        """`plan_room` for this store as it is now (reads sizes, changes nothing)."""
        kept = self._same_install(self.install_dir(release, version), m)  # a rollback to a kept copy adds nothing
        return plan_room(
            self.snapshot(),
            release=release,
            version=int(version),
            sizes={f.sha256: f.size for f in m.files},
            overhead=0 if kept else self.install_overhead(m),
            keep=keep,
            reserved=reserved or {},
            budget=budget,
        )

    def make_room(
        self,
        release: str,
        version: int,
        m: manifest.Manifest,
        *,
        budget: int | None,
        keep: Collection[str] = (),
        reserved: Mapping[str, int] | None = None,
    ) -> RoomPlan:
        """Make room within `budget` for pulling and installing `m` as `release` v`version`, or refuse.

        `keep`: digests of other installs in progress (their blobs and partials stay); `reserved`:
        digest -> declared size of what those installs are still downloading (counted as used).
        Frees space in the order the module docstring gives; raises DiskBudgetExceeded, having
        removed nothing, when the version cannot fit even then. Returns the plan it carried out.
        """
        plan = self.plan_room(release, version, m, budget=budget, keep=keep, reserved=reserved)
        if not plan.fits:
            raise DiskBudgetExceeded(plan.message, plan=plan, manifest=m)
        for r, v in plan.evict:
            self._remove_install(r, v)
        if plan.gc:
            for f in m.files:
                if self.partial_size(f.sha256) > f.size:  # cannot be resumed from: would restart anyway
                    self.partial_path(f.sha256).unlink(missing_ok=True)
            self.gc(keep={f.sha256 for f in m.files} | set(keep) | set(reserved or {}))
        return plan

    def _remove_install(self, release: str, version: int) -> None:
        if self.current(release) == version:
            raise errors.FailedPrecondition(f"{release} v{version} is the running version")
        path = self.install_dir(release, version)
        if path.is_dir():
            doomed = self.installs / f".removing-{path.parent.name}-{version}-{os.getpid()}"
            os.rename(path, doomed)  # never a half-deleted install that looks valid
            shutil.rmtree(doomed, ignore_errors=True)
            fsync_dir(path.parent)


# ---------------------------------------------------------------- disk budget (pure)

_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_UNITS = {
    "": 1,
    "b": 1,
    **{p + "b": 1000**n for n, p in enumerate("kmgt", 1)},
    **{p: 1024**n for n, p in enumerate("kmgt", 1)},
    **{p + "i": 1024**n for n, p in enumerate("kmgt", 1)},
    **{p + "ib": 1024**n for n, p in enumerate("kmgt", 1)},
}


def parse_size(text: str | int, *, what: str = "disk budget") -> int | None:
    """Bytes of a size such as `500MB`, `2GiB`, `1.5G` or `1048576`; None for `unlimited` (or `none`).

    kB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB (also Ki.. and bare K, M, G, T, as systemd
    and Docker read them) are powers of 1024. Units are case-insensitive. InvalidArgument when it is
    not a size, or not more than 0.
    """
    prefix = f"{what}: " if what else ""
    if isinstance(text, int) and not isinstance(text, bool):
        raw = str(text)
    elif isinstance(text, str):
        raw = text
    else:
        raise errors.InvalidArgument(f"{prefix}{text!r} is not a size")
    value = raw.strip().lower()
    if value in {"unlimited", "none"}:
        return None
    match = _SIZE.fullmatch(value)
    if match is None:
        raise errors.InvalidArgument(
            f"{prefix}{raw!r} is not a size; use a number of bytes with an optional unit "
            "(500MB, 2GiB, 1048576) or 'unlimited'"
        )
    number, unit = match.groups()
    if unit not in _UNITS:
        raise errors.InvalidArgument(
            f"{prefix}unknown unit {unit!r} in {raw!r}; use B, kB, MB, GB, TB (powers of 1000) "
            "or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    try:
        n = int(Decimal(number) * _UNITS[unit])
    except InvalidOperation:
        raise errors.InvalidArgument(f"{prefix}{raw!r} is not a size") from None
    if n <= 0:
        raise errors.InvalidArgument(f"{prefix}{raw!r} must be more than 0 bytes ('unlimited' for no budget)")
    return n


def format_size(n: int) -> str:
    """`1 GiB`, `500 MB`, `476.8 MiB`, `12 B`: exact when it is a whole number of a unit."""
    n = int(n)
    binary = [("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)]
    decimal = [("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("kB", 1000)]
    for unit, base in binary + decimal:
        if n >= base and n % base == 0:
            return f"{n // base} {unit}"
    for unit, base in binary:
        if n >= base:
            return f"{n / base:.1f} {unit}"
    return f"{n} B"


@dataclasses.dataclass(frozen=True)
class InstallSize:
    """One installed version: the blobs it references and the bytes of its own files (manifest, copies)."""

    digests: frozenset[str]
    own_bytes: int = 0
    mtime: float = 0.0


@dataclasses.dataclass(frozen=True)
class StoreSnapshot:
    """The store's contents and sizes; pure data, so the budget maths is testable without files."""

    blobs: Mapping[str, int]  # digest -> bytes of a verified blob
    partials: Mapping[str, int]  # digest -> bytes of an interrupted download
    installs: Mapping[tuple[str, int], InstallSize]
    current: Mapping[str, int]  # release -> running version
    leftovers: int = 0  # staging and half-removed directories

    @property
    def total(self) -> int:
        return (
            sum(self.blobs.values())
            + sum(self.partials.values())
            + sum(i.own_bytes for i in self.installs.values())
            + self.leftovers
        )

    def rollback_target(self, release: str) -> int | None:
        """The version kept for a rollback of `release`: the newest one older than the running one."""
        cur = self.current.get(release)
        if cur is None:
            return None
        return max((v for r, v in self.installs if r == release and v < cur), default=None)

    def version_bytes(self, key: tuple[str, int]) -> int:
        """Bytes of one installed version: its blobs (shared ones too) and its own files."""
        inst = self.installs[key]
        return sum(self.blobs.get(d, 0) for d in inst.digests) + inst.own_bytes

    def to_json(self, budget: int | None = None) -> dict[str, Any]:
        """What `tether agent disk --json` prints and the agent logs."""
        return {
            "budget": budget,
            "used": self.total,
            "blobs": sum(self.blobs.values()),
            "partial": sum(self.partials.values()),
            "installs": sum(i.own_bytes for i in self.installs.values()) + self.leftovers,
            "versions": [
                {
                    "release": r,
                    "version": v,
                    "role": "running"
                    if self.current.get(r) == v
                    else "rollback"
                    if self.rollback_target(r) == v
                    else "old",
                    "bytes": self.version_bytes((r, v)),
                }
                for r, v in sorted(self.installs)
            ],
        }

    def describe(self, budget: int | None = None) -> str:
        """One line: `12.3 MiB of 1 GiB (1%): blobs 12.2 MiB, partial downloads 0 B, ...`."""
        used = self.total
        of = "" if budget is None else f" of {format_size(budget)} ({100 * used / budget:.0f}%)"
        doc = self.to_json(budget)
        return (
            f"{format_size(used)}{of}: blobs {format_size(doc['blobs'])}, partial downloads "
            f"{format_size(doc['partial'])}, install files {format_size(doc['installs'])}; "
            f"{len(self.installs)} installed versions of {len({r for r, _ in self.installs})} releases"
        )


@dataclasses.dataclass(frozen=True)
class RoomPlan:
    """How a version fits the budget: what to free first, or why it cannot fit."""

    fits: bool
    need: int  # bytes the version still needs (missing blobs less their partial bytes, plus its install files)
    used: int  # bytes in the store now
    reserved: int  # bytes other downloads in progress still need
    after: int  # bytes in the store once the plan ran (before the pull)
    budget: int | None
    gc: bool = False  # drop unreferenced blobs, stray partials and leftovers
    evict: tuple[tuple[str, int], ...] = ()  # installed versions to remove, in this order
    message: str = ""  # why it does not fit


class DiskBudgetExceeded(errors.TooLarge):
    """A version does not fit the agent's disk budget even after freeing all it may free."""

    def __init__(self, message: str, *, plan: RoomPlan, manifest: manifest.Manifest | None = None) -> None:
        super().__init__(message)
        self.plan = plan
        self.manifest = manifest  # the version refused, so a retry can plan again without fetching it


def _still_needed(sizes: Mapping[str, int], snap: StoreSnapshot, *, skip: Collection[str] = ()) -> int:
    """Declared bytes not on disk yet: blobs not in the cache, less what their partials hold."""
    total = 0
    for digest, size in sizes.items():
        if digest in snap.blobs or digest in skip:
            continue
        partial = snap.partials.get(digest, 0)
        total += size - partial if partial <= size else size  # a partial longer than the blob starts over
    return total


def plan_room(
    snap: StoreSnapshot,
    *,
    release: str,
    version: int,
    sizes: Mapping[str, int],
    overhead: int = 0,
    keep: Collection[str] = (),
    reserved: Mapping[str, int] | None = None,
    budget: int | None,
) -> RoomPlan:
    """Plan room for `release` v`version` whose blobs are `sizes` (digest -> declared bytes). No I/O.

    Fits when used + reserved + need <= budget. Otherwise frees, in order, until it fits:
    1. blobs no install references, partials and leftovers of nothing wanted, partials longer
       than their blob (`gc`);
    2. installed versions that are neither running nor a rollback target (for `release`: those
       its install would prune anyway), oldest first;
    3. rollback targets (for `release`: the one its install would keep), oldest first.
    The running version of each release is never removed. Blobs of `sizes`, `keep` and
    `reserved` stay. When even all that is not enough, nothing is removed (`fits` False).
    """
    reserved = dict(reserved or {})
    need = _still_needed(sizes, snap) + (overhead if sizes else 0)
    pending = _still_needed(reserved, snap, skip=sizes)
    used = snap.total
    if need == 0 or budget is None or used + pending + need <= budget:
        return RoomPlan(fits=True, need=need, used=used, reserved=pending, after=used, budget=budget)

    wanted = set(sizes) | set(keep) | set(reserved)
    # Partials worth keeping: wanted, and not longer than the blob (such a one restarts from 0 anyway).
    resumable = {d for d in snap.partials if d in wanted and not snap.partials[d] > sizes.get(d, snap.partials[d])}
    installs = dict(snap.installs)

    def size_now() -> int:
        refs = wanted.union(*(i.digests for i in installs.values()))
        return (
            sum(n for d, n in snap.blobs.items() if d in refs)
            + sum(n for d, n in snap.partials.items() if d in resumable)
            + sum(i.own_bytes for i in installs.values())
        )

    def ordered(keys: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return sorted(keys, key=lambda k: (snap.installs[k].mtime, k))

    older = [v for r, v in snap.installs if r == release and v < version]
    kept_after = max(older, default=None)  # what the install of `version` keeps for rollback
    stale, rollback = [], []
    for key in snap.installs:
        r, v = key
        if snap.current.get(r) == v:
            continue  # running: never removed here
        is_rollback = (v == kept_after) if r == release else (v == snap.rollback_target(r))
        (rollback if is_rollback else stale).append(key)

    evict: list[tuple[str, int]] = []
    after = size_now()
    for key in [None, *ordered(stale), *ordered(rollback)]:
        if key is not None:
            removed = installs.pop(key)
            if size_now() == after:  # frees nothing (its blobs are shared with what stays): keep it
                installs[key] = removed
                continue
            evict.append(key)
            after = size_now()
        if after + pending + need <= budget:
            return RoomPlan(
                fits=True,
                need=need,
                used=used,
                reserved=pending,
                after=after,
                budget=budget,
                gc=True,
                evict=tuple(evict),
            )
    message = f"disk budget {format_size(budget)} exceeded: {release} v{version} needs {format_size(need)} more"
    if need > budget:
        message += ", more than the whole budget"
    else:
        running = ", ".join(f"{r} v{v}" for r, v in sorted(installs)) or "none"
        message += f", {format_size(after)} in use (running versions: {running}"
        own = sum(min(snap.partials.get(d, 0), n) for d, n in sizes.items() if d not in snap.blobs)
        if own:
            message += f"; {format_size(own)} already downloaded for it"
        message += ")"
        if pending:
            message += f" and {format_size(pending)} reserved for other downloads in progress"
    message += "; raise --disk-budget or remove releases from this device"
    return RoomPlan(fits=False, need=need, used=used, reserved=pending, after=after, budget=budget, message=message)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
