"""The device-side bundle store: verified blobs, partial downloads, installed versions, task state, results.

Layout of a state directory::

    state.json                     the agent's durable state (tether.agent.statefile)
    blobs/sha256/<hex>             verified, read-only blobs, shared by every task and version
    blobs/partial/<hex>.part       interrupted downloads; a pull resumes from the file's size
    installs/<release>/<version>/  one installed bundle version (files hardlinked from blobs): the bundle's tree
                                   and nothing else (the agent writes nothing inside it)
    installs/<release>/<version>.manifest.json  that version's manifest: bookkeeping beside the tree, never in it
    installs/<release>/current     the active version number (atomic pointer file)
    installs/<release>/.staging-*  an install being assembled (removed by `gc`)
    taskstate/<release>.json       `ctx.state` of a task, kept between runs
    results/<key>.pb               a finished run's upload, kept until the controller acknowledged it

`<release>` is the release name percent-encoded (`ns%2Fname`), so distinct
releases never share a directory.

Installed files are hard links to cached blobs, so a write into an install
would change a blob every release shares. The store therefore never writes a
file inside an install tree: files are linked (or, where links fail, copied
into a file created exclusively), bookkeeping lives beside the tree, and a
manifest whose paths collide (`tether.common.manifest.check_paths`: reserved
names, case or normalisation duplicates, a file where a directory must be) is
refused before it gets here.

Guarantees: a blob appears under `blobs/sha256/` only after its sha256 was
checked; an install directory appears (by one `rename`) only complete and
verified; `current` moves by one `rename`; the previous version is kept for
rollback; a crash at any point leaves either the old or the new state.
Blocking file I/O: call from a worker thread in async code.

Disk budget (`tether agent run --disk-budget`, `make_room`): the store
measures itself (`snapshot`) and carries out what the pure planner
`tether.agent.diskbudget.plan_room` decides (what counts and the eviction order
are described there).
A download never grows past the size its manifest declares (`BlobWriter`), so
a lying server cannot push the store over the budget. Not counted, and bounded
on their own: `state.json` and task state (`MAX_STATE_BYTES` each), results
waiting for upload (pruned run records), `events.db` (count and age retention).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import stat
import tempfile
import urllib.parse
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, BinaryIO

from tether.agent import diskbudget
from tether.agent.files import atomic_write, fsync_dir
from tether.agent.statefile import MAX_STATE_BYTES
from tether.common import errors, manifest
from tether.spec import names

LEGACY_MANIFEST_FILE = ".tether-manifest.json"  # inside the tree, before 0.x: moved out when the store opens
MANIFEST_SUFFIX = ".manifest.json"
MAX_RELEASE_LEN = names.MAX_RELEASE_LEN  # `<namespace>/<name>` at Kubernetes' longest
RELEASE_NAME_FILE = "release"  # in a release directory whose name is a hash: the release's name


def release_dirname(release: str) -> str:
    """The file name for `release` (`names.file_name`: percent-encoded, or hashed when that would be too long)."""
    if not isinstance(release, str) or not release or len(release) > MAX_RELEASE_LEN or "\x00" in release:
        raise errors.InvalidArgument(
            f"release: {errors.excerpt(release)} must be a non-empty name of at most {MAX_RELEASE_LEN}"
        )
    name = names.file_name(release)
    if name.startswith("."):  # ".", "..", and the store's own ".staging-*" / ".removing-*" names
        raise errors.InvalidArgument(f"release: {errors.excerpt(release)} is not a valid name")
    return name


def _place(blob: pathlib.Path, dest: pathlib.Path) -> None:
    """Put a cached blob at `dest`, a path that must not exist: a hard link, else an exclusive copy.

    Never opens an existing file for writing, so nothing written here can reach a cached blob
    through a link (a path that exists already, e.g. a case duplicate on a case-insensitive
    filesystem, is refused).
    """
    try:
        os.link(blob, dest)
        return
    except FileExistsError:
        raise errors.InvalidManifest(f"{dest.name!r}: two bundle files at one path on this filesystem") from None
    except OSError:
        pass  # no hard links here (another filesystem, or none supported): copy
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o444)
    except FileExistsError:
        raise errors.InvalidManifest(f"{dest.name!r}: two bundle files at one path on this filesystem") from None
    with open(blob, "rb") as src, os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(src, out)


def _hex(digest: str) -> str:
    return manifest.check_digest(digest).split(":", 1)[1]


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
        self._move_legacy_manifests()

    def _move_legacy_manifests(self) -> None:
        """Installs made before the manifest moved out of the tree: rename it beside the tree (no write)."""
        for rdir in self.installs.iterdir():
            if rdir.name.startswith(".") or not rdir.is_dir():
                continue
            for vdir in rdir.iterdir():
                legacy = vdir / LEGACY_MANIFEST_FILE
                if vdir.name.isdigit() and legacy.is_file() and not legacy.is_symlink():
                    target = rdir / f"{vdir.name}{MANIFEST_SUFFIX}"
                    if target.exists():
                        legacy.unlink()
                    else:
                        os.rename(legacy, target)

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

    def manifest_path(self, release: str, version: int) -> pathlib.Path:
        """Where the store keeps the manifest of an installed version: beside its tree, not in it."""
        return self.release_dir(release) / f"{int(version)}{MANIFEST_SUFFIX}"

    def installed_manifest(self, release: str, version: int) -> manifest.Manifest:
        return manifest.Manifest.from_bytes(self.manifest_path(release, version).read_bytes())

    def install(self, release: str, version: int, m: manifest.Manifest) -> pathlib.Path:
        """Assemble version `version` of `release` from cached blobs, then make it current.

        Every blob is re-hashed while it is linked in, so a corrupted cache is caught (the bad
        blob is dropped and DigestMismatch raised) and nothing is installed.
        """
        version = int(version)
        missing = self.missing_blobs(m)
        if missing:
            raise errors.FailedPrecondition(f"cannot install {release} v{version}: {len(missing)} blobs missing")
        manifest.check_paths(f.path for f in m.files)  # however `m` was made: nothing may land outside its file
        rdir = self.release_dir(release)
        rdir.mkdir(parents=True, exist_ok=True)
        if names.is_hashed_file_name(rdir.name) and not (rdir / RELEASE_NAME_FILE).is_file():
            atomic_write(rdir / RELEASE_NAME_FILE, release.encode("utf-8"))  # `releases()` reads the name back
        final = rdir / str(version)
        if final.is_dir() and not self._same_install(release, version, m):
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
                    _place(blob, dest)
                for d in sorted({p.parent for p in staging.rglob("*")}, key=lambda p: -len(p.parts)):
                    fsync_dir(d)
                # The bookkeeping first (a new file, replaced by rename), then the tree by one rename.
                atomic_write(self.manifest_path(release, version), m.canonical_bytes())
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_dir(rdir)
        atomic_write(rdir / "current", f"{version}\n".encode())
        self._prune_versions(release, keep={version, *self._previous(release, version)})
        return final

    def _same_install(self, release: str, version: int, m: manifest.Manifest) -> bool:
        try:
            return (
                self.install_dir(release, version).is_dir()
                and self.manifest_path(release, version).read_bytes() == m.canonical_bytes()
            )
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
                self.manifest_path(release, v).unlink(missing_ok=True)

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
        out = []
        for p in self.installs.iterdir():
            if not p.is_dir() or p.name.startswith("."):
                continue
            if names.is_hashed_file_name(p.name):
                try:
                    out.append((p / RELEASE_NAME_FILE).read_text("utf-8"))
                except OSError:  # a crash between mkdir and the name file: nothing installed there yet
                    continue
            else:
                out.append(urllib.parse.unquote(p.name))
        return sorted(out)

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
        return self.results / f"{names.file_name(key)}.pb"

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
    def snapshot(self) -> diskbudget.StoreSnapshot:
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
            for dirpath, _, files in os.walk(root):
                total += sum(sized(pathlib.Path(dirpath, n)) for n in files)
            return total

        blobs = {f"sha256:{p.name}": sized(p) for p in self.blobs.iterdir()}
        partials = {f"sha256:{p.name.removesuffix('.part')}": sized(p) for p in self.partials.iterdir()}
        installs: dict[tuple[str, int], diskbudget.InstallSize] = {}
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
                installs[(release, v)] = diskbudget.InstallSize(
                    digests=digests, own_bytes=tree(path) + sized(self.manifest_path(release, v)), mtime=mtime
                )
        try:
            leftovers = sum(tree(p) for p in self._leftovers())
        except OSError:
            leftovers = 0
        return diskbudget.StoreSnapshot(
            blobs=blobs, partials=partials, installs=installs, current=current, leftovers=leftovers
        )

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
    ) -> diskbudget.RoomPlan:
        """`plan_room` for this store as it is now (reads sizes, changes nothing)."""
        kept = self._same_install(release, version, m)  # a rollback to a kept copy adds nothing
        return diskbudget.plan_room(
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
    ) -> diskbudget.RoomPlan:
        """Make room within `budget` for pulling and installing `m` as `release` v`version`, or refuse.

        `keep`: digests of other installs in progress (their blobs and partials stay); `reserved`:
        digest -> declared size of what those installs are still downloading (counted as used).
        Frees space in the order the module docstring gives; raises DiskBudgetExceeded, having
        removed nothing, when the version cannot fit even then. Returns the plan it carried out.
        """
        plan = self.plan_room(release, version, m, budget=budget, keep=keep, reserved=reserved)
        if not plan.fits:
            raise diskbudget.DiskBudgetExceeded(plan.message, plan=plan, manifest=m)
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
            self.manifest_path(release, version).unlink(missing_ok=True)
            fsync_dir(path.parent)
