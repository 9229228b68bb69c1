from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeliveryState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIVERY_STATE_UNSPECIFIED: _ClassVar[DeliveryState]
    DELIVERY_STATE_NOTIFIED: _ClassVar[DeliveryState]
    DELIVERY_STATE_DOWNLOADING: _ClassVar[DeliveryState]
    DELIVERY_STATE_INSTALLED: _ClassVar[DeliveryState]
    DELIVERY_STATE_RUNNING: _ClassVar[DeliveryState]
    DELIVERY_STATE_SUCCEEDED: _ClassVar[DeliveryState]
    DELIVERY_STATE_FAILED: _ClassVar[DeliveryState]
    DELIVERY_STATE_REFUSED: _ClassVar[DeliveryState]
    DELIVERY_STATE_UNINSTALLED: _ClassVar[DeliveryState]
DELIVERY_STATE_UNSPECIFIED: DeliveryState
DELIVERY_STATE_NOTIFIED: DeliveryState
DELIVERY_STATE_DOWNLOADING: DeliveryState
DELIVERY_STATE_INSTALLED: DeliveryState
DELIVERY_STATE_RUNNING: DeliveryState
DELIVERY_STATE_SUCCEEDED: DeliveryState
DELIVERY_STATE_FAILED: DeliveryState
DELIVERY_STATE_REFUSED: DeliveryState
DELIVERY_STATE_UNINSTALLED: DeliveryState

class DeviceInfo(_message.Message):
    __slots__ = ("device_id", "attributes", "backends")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    attributes: _containers.ScalarMap[str, str]
    backends: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., backends: _Optional[_Iterable[str]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("bootstrap_token", "device")
    BOOTSTRAP_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    bootstrap_token: str
    device: DeviceInfo
    def __init__(self, bootstrap_token: _Optional[str] = ..., device: _Optional[_Union[DeviceInfo, _Mapping]] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id", "credential", "expires_at")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    credential: str
    expires_at: int
    def __init__(self, device_id: _Optional[str] = ..., credential: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class RenewCredentialRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RenewCredentialResponse(_message.Message):
    __slots__ = ("credential", "expires_at")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    credential: str
    expires_at: int
    def __init__(self, credential: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class DesiredTask(_message.Message):
    __slots__ = ("release", "version", "manifest_digest", "trigger_json", "resources_json", "rollback")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_JSON_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_JSON_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    release: str
    version: int
    manifest_digest: str
    trigger_json: str
    resources_json: str
    rollback: bool
    def __init__(self, release: _Optional[str] = ..., version: _Optional[int] = ..., manifest_digest: _Optional[str] = ..., trigger_json: _Optional[str] = ..., resources_json: _Optional[str] = ..., rollback: _Optional[bool] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("installed",)
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    installed: _containers.RepeatedCompositeFieldContainer[DesiredTask]
    def __init__(self, installed: _Optional[_Iterable[_Union[DesiredTask, _Mapping]]] = ...) -> None: ...

class Sync(_message.Message):
    __slots__ = ("desired",)
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    desired: _containers.RepeatedCompositeFieldContainer[DesiredTask]
    def __init__(self, desired: _Optional[_Iterable[_Union[DesiredTask, _Mapping]]] = ...) -> None: ...

class Notify(_message.Message):
    __slots__ = ("task", "sent_at_ms", "manifest", "pull_spread_ms", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PULL_SPREAD_MS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    task: DesiredTask
    sent_at_ms: int
    manifest: GetManifestResponse
    pull_spread_ms: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, task: _Optional[_Union[DesiredTask, _Mapping]] = ..., sent_at_ms: _Optional[int] = ..., manifest: _Optional[_Union[GetManifestResponse, _Mapping]] = ..., pull_spread_ms: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Revoke(_message.Message):
    __slots__ = ("release",)
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    release: str
    def __init__(self, release: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("server_time_ms",)
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    server_time_ms: int
    def __init__(self, server_time_ms: _Optional[int] = ...) -> None: ...

class RunNow(_message.Message):
    __slots__ = ("release", "version", "request_id", "payload_json")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    release: str
    version: int
    request_id: str
    payload_json: str
    def __init__(self, release: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ..., payload_json: _Optional[str] = ...) -> None: ...

class ServerEvent(_message.Message):
    __slots__ = ("sync", "notify", "revoke", "heartbeat", "run")
    SYNC_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_FIELD_NUMBER: _ClassVar[int]
    REVOKE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    sync: Sync
    notify: Notify
    revoke: Revoke
    heartbeat: Heartbeat
    run: RunNow
    def __init__(self, sync: _Optional[_Union[Sync, _Mapping]] = ..., notify: _Optional[_Union[Notify, _Mapping]] = ..., revoke: _Optional[_Union[Revoke, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., run: _Optional[_Union[RunNow, _Mapping]] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("release", "manifest_digest")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    release: str
    manifest_digest: str
    def __init__(self, release: _Optional[str] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class GetManifestResponse(_message.Message):
    __slots__ = ("manifest", "signature", "key_id", "blob_urls")
    class BlobUrlsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    BLOB_URLS_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    signature: bytes
    key_id: str
    blob_urls: _containers.ScalarMap[str, str]
    def __init__(self, manifest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ..., blob_urls: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PullBlobRequest(_message.Message):
    __slots__ = ("release", "digest", "offset")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    release: str
    digest: str
    offset: int
    def __init__(self, release: _Optional[str] = ..., digest: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class BlobRange(_message.Message):
    __slots__ = ("digest", "offset")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    digest: str
    offset: int
    def __init__(self, digest: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class PullBlobsRequest(_message.Message):
    __slots__ = ("release", "blobs")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    release: str
    blobs: _containers.RepeatedCompositeFieldContainer[BlobRange]
    def __init__(self, release: _Optional[str] = ..., blobs: _Optional[_Iterable[_Union[BlobRange, _Mapping]]] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size", "digest")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    digest: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class ReportStatusRequest(_message.Message):
    __slots__ = ("release", "version", "state", "message", "device_state", "url_failures")
    class DeviceStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class UrlFailuresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_STATE_FIELD_NUMBER: _ClassVar[int]
    URL_FAILURES_FIELD_NUMBER: _ClassVar[int]
    release: str
    version: int
    state: DeliveryState
    message: str
    device_state: _containers.ScalarMap[str, str]
    url_failures: _containers.ScalarMap[str, int]
    def __init__(self, release: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[DeliveryState, str]] = ..., message: _Optional[str] = ..., device_state: _Optional[_Mapping[str, str]] = ..., url_failures: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ReportStatusResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadResultRequest(_message.Message):
    __slots__ = ("release", "version", "idempotency_key", "sample_count", "metrics", "tensors", "counts", "duration_s")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    release: str
    version: int
    idempotency_key: str
    sample_count: int
    metrics: _containers.ScalarMap[str, float]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    counts: _containers.ScalarMap[str, int]
    duration_s: float
    def __init__(self, release: _Optional[str] = ..., version: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., sample_count: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., counts: _Optional[_Mapping[str, int]] = ..., duration_s: _Optional[float] = ...) -> None: ...

class UploadResultResponse(_message.Message):
    __slots__ = ("duplicate",)
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    def __init__(self, duplicate: _Optional[bool] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("release", "round", "version", "sample_count", "metrics", "encoding", "size", "sha256")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    release: str
    round: int
    version: int
    sample_count: int
    metrics: _containers.ScalarMap[str, float]
    encoding: str
    size: int
    sha256: str
    def __init__(self, release: _Optional[str] = ..., round: _Optional[int] = ..., version: _Optional[int] = ..., sample_count: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., encoding: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PushUpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushUpdateResponse(_message.Message):
    __slots__ = ("accepted", "refusal", "message", "digest")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    refusal: str
    message: str
    digest: str
    def __init__(self, accepted: _Optional[bool] = ..., refusal: _Optional[str] = ..., message: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class GetDesiredRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackendChoice(_message.Message):
    __slots__ = ("model_key", "candidate", "latency_ms", "release", "model")
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model_key: str
    candidate: str
    latency_ms: float
    release: str
    model: str
    def __init__(self, model_key: _Optional[str] = ..., candidate: _Optional[str] = ..., latency_ms: _Optional[float] = ..., release: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ReportBackendsRequest(_message.Message):
    __slots__ = ("choices", "fingerprint", "backends")
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    choices: _containers.RepeatedCompositeFieldContainer[BackendChoice]
    fingerprint: str
    backends: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, choices: _Optional[_Iterable[_Union[BackendChoice, _Mapping]]] = ..., fingerprint: _Optional[str] = ..., backends: _Optional[_Iterable[str]] = ...) -> None: ...

class ReportBackendsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MissingBlobsRequest(_message.Message):
    __slots__ = ("digests",)
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digests: _Optional[_Iterable[str]] = ...) -> None: ...

class MissingBlobsResponse(_message.Message):
    __slots__ = ("missing",)
    MISSING_FIELD_NUMBER: _ClassVar[int]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, missing: _Optional[_Iterable[str]] = ...) -> None: ...

class PutBlobChunk(_message.Message):
    __slots__ = ("digest", "data")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    digest: str
    data: bytes
    def __init__(self, digest: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutBlobResponse(_message.Message):
    __slots__ = ("digest", "size")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class PutManifestRequest(_message.Message):
    __slots__ = ("manifest", "signature", "key_id")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    signature: bytes
    key_id: str
    def __init__(self, manifest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class PutManifestResponse(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class Selector(_message.Message):
    __slots__ = ("match_labels", "match_expressions", "match_versions", "device_ids", "exclude")
    class MatchLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MatchVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MATCH_LABELS_FIELD_NUMBER: _ClassVar[int]
    MATCH_EXPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    MATCH_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    match_labels: _containers.ScalarMap[str, str]
    match_expressions: _containers.RepeatedCompositeFieldContainer[LabelRequirement]
    match_versions: _containers.ScalarMap[str, str]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    exclude: _containers.RepeatedCompositeFieldContainer[Selector]
    def __init__(self, match_labels: _Optional[_Mapping[str, str]] = ..., match_expressions: _Optional[_Iterable[_Union[LabelRequirement, _Mapping]]] = ..., match_versions: _Optional[_Mapping[str, str]] = ..., device_ids: _Optional[_Iterable[str]] = ..., exclude: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ...) -> None: ...

class LabelRequirement(_message.Message):
    __slots__ = ("key", "operator", "values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    operator: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., operator: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("timeout_seconds", "memory_mb", "cpu_seconds")
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: int
    memory_mb: int
    cpu_seconds: int
    def __init__(self, timeout_seconds: _Optional[int] = ..., memory_mb: _Optional[int] = ..., cpu_seconds: _Optional[int] = ...) -> None: ...

class RolloutDocument(_message.Message):
    __slots__ = ("version", "salt", "stage", "action", "stages", "report_deadline_seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    REPORT_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    salt: str
    stage: int
    action: str
    stages: _containers.RepeatedCompositeFieldContainer[RolloutStage]
    report_deadline_seconds: int
    def __init__(self, version: _Optional[int] = ..., salt: _Optional[str] = ..., stage: _Optional[int] = ..., action: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[RolloutStage, _Mapping]]] = ..., report_deadline_seconds: _Optional[int] = ...) -> None: ...

class RolloutStage(_message.Message):
    __slots__ = ("percent", "count", "cohort")
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    percent: int
    count: int
    cohort: Selector
    def __init__(self, percent: _Optional[int] = ..., count: _Optional[int] = ..., cohort: _Optional[_Union[Selector, _Mapping]] = ...) -> None: ...

class ReleaseSpec(_message.Message):
    __slots__ = ("release", "generation", "manifest_digest", "target_json", "trigger_json", "aggregation_json", "paused", "resources_json", "rollout_json", "target", "resources", "rollout", "federated_json")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TARGET_JSON_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_JSON_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_JSON_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_JSON_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_JSON_FIELD_NUMBER: _ClassVar[int]
    release: str
    generation: int
    manifest_digest: str
    target_json: str
    trigger_json: str
    aggregation_json: str
    paused: bool
    resources_json: str
    rollout_json: str
    target: Selector
    resources: Resources
    rollout: RolloutDocument
    federated_json: str
    def __init__(self, release: _Optional[str] = ..., generation: _Optional[int] = ..., manifest_digest: _Optional[str] = ..., target_json: _Optional[str] = ..., trigger_json: _Optional[str] = ..., aggregation_json: _Optional[str] = ..., paused: _Optional[bool] = ..., resources_json: _Optional[str] = ..., rollout_json: _Optional[str] = ..., target: _Optional[_Union[Selector, _Mapping]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., rollout: _Optional[_Union[RolloutDocument, _Mapping]] = ..., federated_json: _Optional[str] = ...) -> None: ...

class ApplyReleaseRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ReleaseSpec
    def __init__(self, spec: _Optional[_Union[ReleaseSpec, _Mapping]] = ...) -> None: ...

class ApplyReleaseResponse(_message.Message):
    __slots__ = ("release", "version", "changed")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    release: str
    version: int
    changed: bool
    def __init__(self, release: _Optional[str] = ..., version: _Optional[int] = ..., changed: _Optional[bool] = ...) -> None: ...

class DeleteReleaseRequest(_message.Message):
    __slots__ = ("release",)
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    release: str
    def __init__(self, release: _Optional[str] = ...) -> None: ...

class DeleteReleaseResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class GetReleaseStatusRequest(_message.Message):
    __slots__ = ("release", "report_deadline_seconds")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    REPORT_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    release: str
    report_deadline_seconds: int
    def __init__(self, release: _Optional[str] = ..., report_deadline_seconds: _Optional[int] = ...) -> None: ...

class ReleaseStatus(_message.Message):
    __slots__ = ("release", "version", "manifest_digest", "targeted", "notified", "installed", "succeeded", "failed", "refused", "results", "aggregate_json", "aggregate_round", "connected_devices", "health_json", "federated_json", "not_reporting", "report_deadline_seconds")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TARGETED_FIELD_NUMBER: _ClassVar[int]
    NOTIFIED_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_JSON_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_ROUND_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_DEVICES_FIELD_NUMBER: _ClassVar[int]
    HEALTH_JSON_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_JSON_FIELD_NUMBER: _ClassVar[int]
    NOT_REPORTING_FIELD_NUMBER: _ClassVar[int]
    REPORT_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    release: str
    version: int
    manifest_digest: str
    targeted: int
    notified: int
    installed: int
    succeeded: int
    failed: int
    refused: int
    results: int
    aggregate_json: str
    aggregate_round: int
    connected_devices: int
    health_json: str
    federated_json: str
    not_reporting: int
    report_deadline_seconds: int
    def __init__(self, release: _Optional[str] = ..., version: _Optional[int] = ..., manifest_digest: _Optional[str] = ..., targeted: _Optional[int] = ..., notified: _Optional[int] = ..., installed: _Optional[int] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., refused: _Optional[int] = ..., results: _Optional[int] = ..., aggregate_json: _Optional[str] = ..., aggregate_round: _Optional[int] = ..., connected_devices: _Optional[int] = ..., health_json: _Optional[str] = ..., federated_json: _Optional[str] = ..., not_reporting: _Optional[int] = ..., report_deadline_seconds: _Optional[int] = ...) -> None: ...

class ListReleasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevokeDeviceRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class RevokeDeviceResponse(_message.Message):
    __slots__ = ("revoked", "disconnected")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    DISCONNECTED_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    disconnected: bool
    def __init__(self, revoked: _Optional[bool] = ..., disconnected: _Optional[bool] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "include_revoked")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REVOKED_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    include_revoked: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_revoked: _Optional[bool] = ...) -> None: ...

class DeviceRelease(_message.Message):
    __slots__ = ("release", "version", "state")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    release: str
    version: int
    state: str
    def __init__(self, release: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class DeviceSummary(_message.Message):
    __slots__ = ("device_id", "attributes", "backends", "selected_backends", "last_seen_unix", "revoked", "releases", "connected_replica", "device_state")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class DeviceStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_REPLICA_FIELD_NUMBER: _ClassVar[int]
    DEVICE_STATE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    attributes: _containers.ScalarMap[str, str]
    backends: _containers.RepeatedScalarFieldContainer[str]
    selected_backends: _containers.RepeatedScalarFieldContainer[str]
    last_seen_unix: float
    revoked: bool
    releases: _containers.RepeatedCompositeFieldContainer[DeviceRelease]
    connected_replica: str
    device_state: _containers.ScalarMap[str, str]
    def __init__(self, device_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., backends: _Optional[_Iterable[str]] = ..., selected_backends: _Optional[_Iterable[str]] = ..., last_seen_unix: _Optional[float] = ..., revoked: _Optional[bool] = ..., releases: _Optional[_Iterable[_Union[DeviceRelease, _Mapping]]] = ..., connected_replica: _Optional[str] = ..., device_state: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices", "next_page_token")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceSummary]
    next_page_token: str
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TriggerRunRequest(_message.Message):
    __slots__ = ("release", "payload_json", "request_id")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    release: str
    payload_json: str
    request_id: str
    def __init__(self, release: _Optional[str] = ..., payload_json: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class TriggerRunResponse(_message.Message):
    __slots__ = ("request_id", "version", "devices")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    version: int
    devices: int
    def __init__(self, request_id: _Optional[str] = ..., version: _Optional[int] = ..., devices: _Optional[int] = ...) -> None: ...

class ListReleasesResponse(_message.Message):
    __slots__ = ("releases",)
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    releases: _containers.RepeatedCompositeFieldContainer[ReleaseStatus]
    def __init__(self, releases: _Optional[_Iterable[_Union[ReleaseStatus, _Mapping]]] = ...) -> None: ...

class RoundModelRequest(_message.Message):
    __slots__ = ("release", "round")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    release: str
    round: int
    def __init__(self, release: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class RollbackRoundResponse(_message.Message):
    __slots__ = ("release", "version", "model", "cancelled_round")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_ROUND_FIELD_NUMBER: _ClassVar[int]
    release: str
    version: int
    model: str
    cancelled_round: int
    def __init__(self, release: _Optional[str] = ..., version: _Optional[int] = ..., model: _Optional[str] = ..., cancelled_round: _Optional[int] = ...) -> None: ...

class GetServerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RpcStats(_message.Message):
    __slots__ = ("method", "calls", "request_messages", "request_bytes", "response_messages", "response_bytes")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    method: str
    calls: int
    request_messages: int
    request_bytes: int
    response_messages: int
    response_bytes: int
    def __init__(self, method: _Optional[str] = ..., calls: _Optional[int] = ..., request_messages: _Optional[int] = ..., request_bytes: _Optional[int] = ..., response_messages: _Optional[int] = ..., response_bytes: _Optional[int] = ...) -> None: ...

class ServerStats(_message.Message):
    __slots__ = ("replica_id", "connected_devices", "rss_bytes", "cpu_seconds", "open_fds", "rpcs", "remote_changes", "dropped_slow_devices")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_DEVICES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FDS_FIELD_NUMBER: _ClassVar[int]
    RPCS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_CHANGES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SLOW_DEVICES_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    connected_devices: int
    rss_bytes: int
    cpu_seconds: float
    open_fds: int
    rpcs: _containers.RepeatedCompositeFieldContainer[RpcStats]
    remote_changes: int
    dropped_slow_devices: int
    def __init__(self, replica_id: _Optional[str] = ..., connected_devices: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., open_fds: _Optional[int] = ..., rpcs: _Optional[_Iterable[_Union[RpcStats, _Mapping]]] = ..., remote_changes: _Optional[int] = ..., dropped_slow_devices: _Optional[int] = ...) -> None: ...
