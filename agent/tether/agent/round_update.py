"""A federated run's update: what the agent sends through PushUpdate instead of tensors in UploadResult.

A run whose `ctx.inputs["payload"]["federated"]` names a round (the round
driver's RunNow, docs/task-api.md "Federated tasks") returns its delta as
`tensors`. The agent encodes them as the round asks (`updateEncoding`:
float32, float16, int8; `tether.common.tensorfiles`), keeps the bytes and the
header beside the stored result (so a restart sends the same update), pushes
them in 1 MiB chunks, and uploads the result without its tensors. A refusal
by the controller (wrong shape, not selected, round closed, ...) is final for
that update: it is logged and dropped; the result is uploaded anyway.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

from tether.common import errors
from tether.proto.v1 import tether_pb2 as pb

CHUNK_BYTES = 1024 * 1024
ENCODINGS = ("float32", "float16", "int8")  # tether.common.tensorfiles.ENCODINGS (imported only when encoding)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundRun:
    round: int
    encoding: str


def round_of(inputs: Mapping[str, Any]) -> RoundRun | None:
    """The round a run belongs to, from its inputs; None for a run that is not a federated round's."""
    payload = inputs.get("payload")
    fed = payload.get("federated") if isinstance(payload, Mapping) else None
    if not isinstance(fed, Mapping):
        return None
    number = fed.get("round")
    encoding = fed.get("updateEncoding", "float32")
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise errors.TaskFailed(f"payload.federated.round: must be a positive integer, got {number!r}")
    if encoding not in ENCODINGS:
        raise errors.TaskFailed(f"payload.federated.updateEncoding: {encoding!r} is not one of {list(ENCODINGS)}")
    return RoundRun(round=number, encoding=encoding)


def encode(
    tensors: Mapping[str, Any],
    *,
    run: RoundRun,
    release: str,
    version: int,
    sample_count: int,
    metrics: Mapping[str, float],
) -> tuple[pb.UpdateHeader, bytes]:
    """The update's header and bytes (TaskFailed when the tensors cannot be sent in the encoding)."""
    from tether.common import tensorfiles  # safetensors: the agent extra

    if not tensors:
        raise errors.TaskFailed("result tensors: a federated round's run must return its delta as tensors")
    try:
        data = tensorfiles.encode_update(tensors, encoding=run.encoding)
    except tensorfiles.InvalidTensors as e:
        raise errors.TaskFailed(f"result {e}") from None
    header = pb.UpdateHeader(
        release=release,
        round=run.round,
        version=version,
        sample_count=sample_count,
        metrics=dict(metrics),
        encoding=run.encoding,
        size=len(data),
        sha256="sha256:" + hashlib.sha256(data).hexdigest(),
    )
    return header, data


def chunks(header: pb.UpdateHeader, data: bytes) -> Iterator[pb.PushUpdateChunk]:
    yield pb.PushUpdateChunk(header=header, data=data[:CHUNK_BYTES])
    for at in range(CHUNK_BYTES, len(data), CHUNK_BYTES):
        yield pb.PushUpdateChunk(data=data[at : at + CHUNK_BYTES])
