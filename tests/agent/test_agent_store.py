"""The device bundle store: content-addressed blobs, resumable partials, atomic installs, GC, state."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from tether.agent import bundles, statefile
from tether.common import errors, manifest


def make_bundle(tmp_path: pathlib.Path, files: dict[str, bytes], name: str = "b") -> tuple[manifest.Manifest, dict]:
    root = tmp_path / f"src-{name}-{len(list(tmp_path.iterdir()))}"
    root.mkdir()
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    m = manifest.hash_directory(root, name=name, entrypoint="task.py")
    return m, {f.sha256: (root / f.path).read_bytes() for f in m.files}


def fill(s: bundles.BundleStore, blobs: dict[str, bytes]) -> None:
    for digest, data in blobs.items():
        s.put_blob(digest, data)


@pytest.fixture()
def s(tmp_path: pathlib.Path) -> bundles.BundleStore:
    return bundles.BundleStore(tmp_path / "state")


def test_install_is_complete_and_current(s, tmp_path) -> None:
    m, blobs = make_bundle(tmp_path, {"task.py": b"def run(ctx): pass\n", "sub/w.bin": b"\x00" * 1000})
    assert len(s.missing_blobs(m)) == 2
    fill(s, blobs)
    assert s.missing_blobs(m) == []
    path = s.install("ns/task", 1, m)
    assert s.current("ns/task") == 1 and s.current_dir("ns/task") == path
    assert (path / "sub" / "w.bin").read_bytes() == b"\x00" * 1000
    assert s.installed_manifest("ns/task", 1) == m
    assert path.parent.name == "ns%2Ftask"  # release names cannot escape or collide
    assert not os.access(path / "task.py", os.W_OK) or os.geteuid() == 0


def test_install_refuses_when_blobs_missing(s, tmp_path) -> None:
    m, blobs = make_bundle(tmp_path, {"task.py": b"x", "b": b"y"})
    s.put_blob(*next(iter(blobs.items())))
    with pytest.raises(errors.FailedPrecondition):
        s.install("r", 1, m)
    assert s.current("r") is None and s.versions("r") == []


def test_partial_download_resumes_from_its_size(s) -> None:
    data = os.urandom(10_000)
    digest = manifest.sha256_digest(data)
    w = s.open_blob(digest, expected_size=len(data))
    w.write(data[:4000], offset=0)
    w.close()  # connection lost
    assert s.partial_size(digest) == 4000 and not s.has_blob(digest)
    w = s.open_blob(digest, expected_size=len(data))
    assert w.offset == 4000
    with pytest.raises(errors.InvalidArgument):
        w.write(data[:10], offset=0)  # chunk does not continue the partial
    w.write(data[4000:], offset=4000)
    w.commit()
    assert s.has_blob(digest) and s.blob_path(digest).read_bytes() == data
    assert s.partial_size(digest) == 0


def test_digest_mismatch_is_refused_and_nothing_kept(s) -> None:
    data = b"good content"
    digest = manifest.sha256_digest(data)
    w = s.open_blob(digest, expected_size=len(data))
    w.write(b"evil content")
    with pytest.raises(errors.DigestMismatch):
        w.commit()
    assert not s.has_blob(digest) and s.partial_size(digest) == 0


def test_oversized_blob_is_refused(s) -> None:
    digest = manifest.sha256_digest(b"abc")
    w = s.open_blob(digest, expected_size=3)
    with pytest.raises(errors.DigestMismatch):
        w.write(b"abcd")


def test_corrupt_cached_blob_fails_install_and_installs_nothing(s, tmp_path) -> None:
    m, blobs = make_bundle(tmp_path, {"task.py": b"print(1)\n", "model.bin": b"weights" * 100})
    fill(s, blobs)
    bad = s.blob_path(m.file("model.bin").sha256)
    os.chmod(bad, 0o644)
    bad.write_bytes(b"rotten" * 100)
    with pytest.raises(errors.DigestMismatch):
        s.install("r", 1, m)
    assert s.current("r") is None and s.versions("r") == []
    assert not bad.exists()  # dropped, so it is downloaded again
    assert not list(s.release_dir("r").glob(".staging-*"))


def test_new_version_keeps_previous_and_prunes_older(s, tmp_path) -> None:
    manifests = []
    for v in range(1, 4):
        m, blobs = make_bundle(tmp_path, {"task.py": f"# v{v}\n".encode(), "shared.bin": b"shared"})
        fill(s, blobs)
        s.install("r", v, m)
        manifests.append(m)
    assert s.current("r") == 3
    assert s.versions("r") == [2, 3]
    assert s.rollback("r") == 2
    assert s.current("r") == 2
    assert (s.current_dir("r") / "task.py").read_bytes() == b"# v2\n"


def test_gc_removes_unreferenced_blobs_and_partials(s, tmp_path) -> None:
    m1, b1 = make_bundle(tmp_path, {"task.py": b"one", "shared.bin": b"shared"})
    m2, b2 = make_bundle(tmp_path, {"task.py": b"two", "shared.bin": b"shared"})
    fill(s, b1 | b2)
    s.install("a", 1, m1)
    orphan = manifest.sha256_digest(b"orphan")
    s.put_blob(orphan, b"orphan")
    inflight = manifest.sha256_digest(b"downloading")
    w = s.open_blob(inflight, expected_size=11)
    w.write(b"down")
    w.close()
    stale = manifest.sha256_digest(b"stale")
    s.partial_path(stale).write_bytes(b"st")
    removed = s.gc(keep={inflight})
    assert set(removed) == {orphan, m2.file("task.py").sha256}
    assert all(s.has_blob(d) for d in m1.blob_digests())
    assert s.partial_size(inflight) == 4 and s.partial_size(stale) == 0
    s.uninstall("a")
    assert s.releases() == []
    s.gc()
    assert list(s.blobs.iterdir()) == []


def test_reinstall_same_version_is_idempotent(s, tmp_path) -> None:
    m, blobs = make_bundle(tmp_path, {"task.py": b"x"})
    fill(s, blobs)
    first = s.install("r", 5, m)
    assert s.install("r", 5, m) == first and s.versions("r") == [5]


def test_release_names_are_validated() -> None:
    for bad in ["", "x" * 400, "a\x00b", ".", "..", ".staging-1"]:
        with pytest.raises(errors.InvalidArgument):
            bundles.release_dirname(bad)
    assert bundles.release_dirname("ns/../x") == "ns%2F..%2Fx"


def test_state_file_roundtrip_and_atomic(tmp_path) -> None:
    sf = statefile.StateFile(tmp_path / "state.json")
    st = sf.load()
    assert st.credential == ""
    st.device_id, st.credential = "d1", "d1.secret"
    st.installed["r"] = statefile.InstalledTask("r", 2, "sha256:" + "0" * 64)
    st.runs["k"] = statefile.RunRecord("k", "r", 2, "onInstall", "uploading", 1.0)
    sf.save(st)
    assert sf.load() == st
    assert oct(os.stat(tmp_path / "state.json").st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp files left
    assert json.loads((tmp_path / "state.json").read_text())["schema"] == statefile.STATE_VERSION


def test_prune_runs_keeps_pending(tmp_path) -> None:
    st = statefile.AgentState()
    for i in range(30):
        st.runs[f"k{i}"] = statefile.RunRecord(f"k{i}", "r", 1, "interval", "uploaded", float(i))
    st.runs["pending"] = statefile.RunRecord("pending", "r", 1, "interval", "uploading", 0.0)
    st.prune_runs(keep_per_release=5)
    assert "pending" in st.runs and len(st.runs) == 6 and "k29" in st.runs
