"""The pull room's BlobSink contract, held by both sinks: the agent's bundle store and the simulator's digests."""

from __future__ import annotations

import hashlib
import pathlib

import pytest

from tether.agent import bundles, pull
from tether.common import errors
from tether.devtools import simagent

DATA = b"0123456789" * 100
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.fixture(params=["file", "digest"])
def sink(request, tmp_path: pathlib.Path) -> pull.BlobSink:
    if request.param == "file":
        return pull.FileSink(bundles.BundleStore(tmp_path / "state"))
    return simagent.DigestSink()


async def test_a_blob_appended_in_order_and_committed_is_held(sink: pull.BlobSink) -> None:
    assert not sink.has(DIGEST) and sink.partial_size(DIGEST) == 0
    w = sink.open(DIGEST, size=len(DATA))
    w.append(DATA[:300], offset=0)
    w.append(DATA[300:], offset=300)
    assert w.offset == w.size == len(DATA)
    await w.commit()
    assert sink.has(DIGEST) and sink.partial_size(DIGEST) == 0


async def test_a_closed_blob_resumes_from_what_it_received(sink: pull.BlobSink) -> None:
    w = sink.open(DIGEST, size=len(DATA))
    w.append(DATA[:400], offset=0)
    w.close()
    assert sink.partial_size(DIGEST) == 400 and not sink.has(DIGEST)
    again = sink.open(DIGEST, size=len(DATA))
    assert again.offset == 400
    again.append(DATA[400:], offset=400)
    await again.commit()
    assert sink.has(DIGEST)


async def test_chunks_out_of_place_or_past_the_size_are_refused(sink: pull.BlobSink) -> None:
    w = sink.open(DIGEST, size=len(DATA))
    with pytest.raises(errors.InvalidArgument):
        w.append(DATA[:10], offset=5)
    w.append(DATA, offset=0)
    with pytest.raises(errors.DigestMismatch):
        w.append(b"x", offset=len(DATA))


async def test_content_that_is_not_the_blob_is_dropped_on_commit(sink: pull.BlobSink) -> None:
    w = sink.open(DIGEST, size=len(DATA))
    w.append(b"y" * len(DATA), offset=0)
    with pytest.raises(errors.DigestMismatch):
        await w.commit()
    assert not sink.has(DIGEST) and sink.partial_size(DIGEST) == 0


async def test_a_discarded_blob_starts_over(sink: pull.BlobSink) -> None:
    w = sink.open(DIGEST, size=len(DATA))
    w.append(DATA[:100], offset=0)
    w.discard()
    assert sink.partial_size(DIGEST) == 0 and sink.open(DIGEST, size=len(DATA)).offset == 0


def test_the_simulator_keeps_digests_only() -> None:
    sink = simagent.DigestSink(full_pull=True)
    assert sink.full_pull and sink.cache == set()
