from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmitRecord(_message.Message):
    __slots__ = ("seq", "topic", "payload", "emitted_at_ms", "release")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    EMITTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    topic: str
    payload: bytes
    emitted_at_ms: int
    release: str
    def __init__(self, seq: _Optional[int] = ..., topic: _Optional[str] = ..., payload: _Optional[bytes] = ..., emitted_at_ms: _Optional[int] = ..., release: _Optional[str] = ...) -> None: ...

class EmitBatch(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[EmitRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[EmitRecord, _Mapping]]] = ...) -> None: ...

class EmitAck(_message.Message):
    __slots__ = ("acked_through", "accepted", "duplicates")
    ACKED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    acked_through: int
    accepted: int
    duplicates: int
    def __init__(self, acked_through: _Optional[int] = ..., accepted: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...
