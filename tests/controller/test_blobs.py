import hashlib
import os

import pytest

from tether.common import errors
from tether.controller import blobs


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def split(data: bytes, size: int):
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


@pytest.fixture()
def store(tmp_path):
    return blobs.FilesystemBlobStore(tmp_path / "blobs", max_blob_bytes=1 << 20)


def stored_files(store):
    return sorted(p for p in store.root.rglob("*") if p.is_file())


def test_is_a_blob_store(store):
    assert isinstance(store, blobs.BlobStore)
    assert store.url_for(digest_of(b"x")) is None


def test_put_then_read_back(store):
    data = os.urandom(300_000)
    d = digest_of(data)
    assert not store.has(d)
    assert store.size(d) is None
    assert store.put_stream(d, split(data, 65_536)) == len(data)
    assert store.has(d)
    assert store.size(d) == len(data)
    assert b"".join(store.read_range(d)) == data
    hex_ = d.removeprefix("sha256:")
    assert store.path_for(d) == store.root / "sha256" / hex_[:2] / hex_[2:4] / hex_
    assert list((store.root / "tmp").iterdir()) == []


def test_empty_blob(store):
    d = digest_of(b"")
    assert store.put_stream(d, []) == 0
    assert store.size(d) == 0
    assert list(store.read_range(d)) == []


@pytest.mark.parametrize("offset", [0, 1, 100_000, 262_144, 299_999, 300_000])
def test_ranged_reads(store, offset):
    data = os.urandom(300_000)
    d = digest_of(data)
    store.put_stream(d, [data])
    chunks = list(store.read_range(d, offset=offset, chunk_size=100_000))
    assert b"".join(chunks) == data[offset:]
    assert all(len(c) <= 100_000 for c in chunks)


def test_bad_ranges_are_refused_eagerly(store):
    d = digest_of(b"abc")
    store.put_stream(d, [b"abc"])
    with pytest.raises(errors.InvalidArgument, match="offset"):
        store.read_range(d, offset=4)
    with pytest.raises(errors.InvalidArgument, match="offset"):
        store.read_range(d, offset=-1)
    with pytest.raises(errors.NotFound):
        store.read_range(digest_of(b"zzz"))


def test_digest_mismatch_leaves_nothing(store):
    claimed = digest_of(b"the real content")
    with pytest.raises(errors.DigestMismatch, match="hashes to"):
        store.put_stream(claimed, [b"tampered ", b"content"])
    assert not store.has(claimed)
    assert stored_files(store) == []


def test_too_large_leaves_nothing(store):
    data = b"x" * ((1 << 20) + 1)
    with pytest.raises(errors.TooLarge):
        store.put_stream(digest_of(data), split(data, 100_000))
    assert stored_files(store) == []


def test_a_failing_stream_leaves_nothing(store):
    def chunks():
        yield b"part"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put_stream(digest_of(b"partial"), chunks())
    assert stored_files(store) == []


def test_storing_twice_is_harmless(store):
    d = digest_of(b"same")
    store.put_stream(d, [b"same"])
    store.put_stream(d, [b"sa", b"me"])
    assert b"".join(store.read_range(d)) == b"same"
    assert len(stored_files(store)) == 1


def test_malformed_digest(store):
    with pytest.raises(errors.InvalidArgument):
        store.has("md5:abc")
    with pytest.raises(errors.InvalidArgument):
        store.put_stream("sha256:../../etc/passwd", [b"x"])


def test_a_new_store_on_the_same_root_sees_the_blobs(tmp_path):
    first = blobs.FilesystemBlobStore(tmp_path)
    d = digest_of(b"persisted")
    first.put_stream(d, [b"persisted"])
    assert blobs.FilesystemBlobStore(tmp_path).has(d)
