"""Every spec <-> wire conversion in one place (the operator->controller contract of `ReleaseSpec`).

Inside the operator and the controller, targets, rollout documents and
resources are the typed values of `tether.spec` (selectors, staging,
resources). They become wire messages here and nowhere else, and come back
from the wire through here, so each is encoded once, at the gRPC edge, in the
manner of Flower's `common/serde.py`.

Decoding always goes through the one parser of each grammar: a message is
turned into the document form and parsed, so a bad value is refused with the
same `errors.InvalidSpec` (and field path) whether it came as a message or as
JSON.

Backward compatibility: `ReleaseSpec` gained typed fields (`target`,
`resources`, `rollout`) next to the deprecated `*_json` ones. Readers prefer
the typed field and read the JSON one only when the typed one is absent (an
older client); writers of typed values also fill the JSON fields
(`legacy_json=True`, the default) so a controller of the previous release
still reads what a newer operator sends. Trigger and aggregation stay JSON:
their shapes are open-ended (free-form stream conditions, aggregation keys
passed through to the worker) and agents read the trigger as JSON.

Pure: no I/O (proto messages are plain data).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tether.common import errors
from tether.proto.v1 import tether_pb2 as pb
from tether.spec import jsontext, resources, selectors, staging

MAX_DOCUMENT_BYTES = 64 * 1024  # a policy document (trigger, aggregation, resources, rollout)
MAX_TARGET_BYTES = 1024 * 1024  # a target may list up to 10,000 device ids

# ---------------------------------------------------------------- selectors


def selector_to_proto(target: selectors.Target) -> pb.Selector:
    """A target (or selector) as its message, from its normalised document."""
    doc = target.document
    return pb.Selector(
        match_labels=dict(doc.get("matchLabels", {})),
        match_expressions=[
            pb.LabelRequirement(key=e["key"], operator=e["operator"], values=list(e.get("values", ())))
            for e in doc.get("matchExpressions", ())
        ],
        match_versions=dict(doc.get("matchVersions", {})),
        device_ids=list(doc.get("deviceIds", ())),
        exclude=[selector_to_proto(e) for e in target.exclude],
    )


def selector_document(message: pb.Selector) -> dict[str, Any]:
    """A message in the document form the parser reads (empty parts left out, as an empty list means "unset")."""
    doc: dict[str, Any] = {}
    if message.match_labels:
        doc["matchLabels"] = dict(message.match_labels)
    if message.match_expressions:
        doc["matchExpressions"] = [
            {"key": e.key, "operator": e.operator, **({"values": list(e.values)} if e.values else {})}
            for e in message.match_expressions
        ]
    if message.match_versions:
        doc["matchVersions"] = dict(message.match_versions)
    if message.device_ids:
        doc["deviceIds"] = list(message.device_ids)
    if message.exclude:
        doc["exclude"] = [selector_document(e) for e in message.exclude]
    return doc


def target_from_proto(message: pb.Selector, *, field: str = "target") -> selectors.Target:
    return selectors.parse_target(selector_document(message), field=field)


def target_from_json(text: str, *, field: str = "target") -> selectors.Target:
    """A target sent as JSON text (the deprecated `target_json`; empty text = every device)."""
    if not text.strip():
        return selectors.Target()
    return selectors.parse_target(parse_json(text, field=field, limit=MAX_TARGET_BYTES), field=field)


def target_json(target: selectors.Target) -> str:
    """The deprecated `target_json` text of a target, as operators have always written it.

    The top level always names matchLabels and matchExpressions, and every
    expression its values (the controller normalises these away).
    """
    doc = _explicit_selector(target.document)
    return canonical({"matchLabels": {}, "matchExpressions": [], **doc})


def _explicit_selector(doc: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    if "matchExpressions" in out:
        out["matchExpressions"] = [{"values": [], **e} for e in out["matchExpressions"]]
    if "exclude" in out:
        out["exclude"] = [_explicit_selector(e) for e in out["exclude"]]
    return out


# ---------------------------------------------------------------- resources


def resources_to_proto(value: resources.Resources) -> pb.Resources:
    return pb.Resources(timeout_seconds=value.timeout_seconds, memory_mb=value.memory_mb, cpu_seconds=value.cpu_seconds)


def resources_document(message: pb.Resources) -> dict[str, int]:
    doc: dict[str, int] = {}
    if message.HasField("timeout_seconds"):
        doc["timeoutSeconds"] = message.timeout_seconds
    if message.HasField("memory_mb"):
        doc["memoryMB"] = message.memory_mb
    if message.HasField("cpu_seconds"):
        doc["cpuSeconds"] = message.cpu_seconds
    return doc


def resources_from_proto(message: pb.Resources, *, field: str = "resources") -> resources.Resources:
    return resources.parse_resources(resources_document(message), field=field)


def resources_json(value: resources.Resources) -> str:
    return canonical(value.to_json())


# ---------------------------------------------------------------- rollout documents


def rollout_to_proto(value: staging.Rollout) -> pb.RolloutDocument:
    return pb.RolloutDocument(
        version=value.version,
        salt=value.salt,
        stage=value.stage,
        action=value.action.value,
        stages=[
            pb.RolloutStage(
                percent=s.percent,
                count=s.count,
                cohort=None if s.cohort is None else selector_to_proto(s.cohort),
            )
            for s in value.stages
        ],
        report_deadline_seconds=value.report_deadline_s,
    )


def rollout_document(message: pb.RolloutDocument) -> dict[str, Any]:
    stages = []
    for s in message.stages:
        stage: dict[str, Any] = {}
        if s.HasField("percent"):
            stage["percent"] = s.percent
        if s.HasField("count"):
            stage["count"] = s.count
        if s.HasField("cohort"):
            stage["cohort"] = selector_document(s.cohort)
        stages.append(stage)
    doc: dict[str, Any] = {
        "version": message.version,
        "salt": message.salt,
        "stage": message.stage,
        "action": message.action or staging.Action.PROGRESS.value,
        "stages": stages,
    }
    if message.HasField("report_deadline_seconds"):
        doc["reportDeadlineSeconds"] = message.report_deadline_seconds
    return doc


def rollout_from_proto(message: pb.RolloutDocument, *, field: str = "rollout") -> staging.Rollout | None:
    return staging.parse_rollout(rollout_document(message), field=field)


def rollout_json(value: staging.Rollout | None) -> str:
    """The deprecated `rollout_json` text ("" = no staging); also what the operator keeps as `appliedDocument`."""
    if value is None:
        return ""
    doc = value.to_json()
    doc["stages"] = [{**s, "cohort": _explicit_selector(s["cohort"])} if "cohort" in s else s for s in doc["stages"]]
    return canonical(doc)


# ---------------------------------------------------------------- JSON documents


def canonical(doc: Mapping[str, Any]) -> str:
    """Sorted keys, no spaces: equal documents are equal text."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def parse_json(text: str, *, field: str, limit: int = MAX_DOCUMENT_BYTES) -> Any:
    """JSON text from the wire, bounded; NaN and Infinity refused (Postgres jsonb refuses them)."""
    if len(text.encode("utf-8")) > limit:
        raise errors.InvalidSpec(f"document larger than {limit} bytes", field=field)
    try:
        return jsontext.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError, or NaN/Infinity
        raise errors.InvalidSpec(f"not valid JSON: {e}", field=field) from None


def parse_object(text: str, *, field: str) -> dict[str, Any]:
    """A JSON object from the wire ("" = {}): trigger, aggregation, payloads and the deprecated fields."""
    if not text.strip():
        return {}
    doc = parse_json(text, field=field)
    if not isinstance(doc, dict):
        raise errors.InvalidSpec("must be a JSON object", field=field)
    return doc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# ---------------------------------------------------------------- ReleaseSpec

Document = Mapping[str, Any]
_Resources = resources.Resources  # `release_spec`'s parameter of the same name hides the module


def release_spec(
    *,
    release: str,
    manifest_digest: str,
    generation: int = 0,
    target: selectors.Target | Document | None = None,
    trigger: Document | None = None,
    aggregation: Document | None = None,
    paused: bool = False,
    resources: resources.Resources | Document | None = None,
    rollout: staging.Rollout | Document | None = None,
    federated: Document | None = None,
    legacy_json: bool = True,
) -> pb.ReleaseSpec:
    """The message for ApplyRelease.

    A typed value travels in its typed field (and, with `legacy_json`, also as
    JSON for controllers of the previous release). A plain mapping is a
    document as someone wrote it (the CLI, tests, older callers): it travels
    as JSON only, for the controller to validate.
    """
    spec = pb.ReleaseSpec(
        release=release,
        generation=generation,
        manifest_digest=manifest_digest,
        trigger_json=json.dumps(dict(trigger or {}), sort_keys=True),
        aggregation_json=json.dumps(dict(aggregation or {}), sort_keys=True),
        paused=paused,
        federated_json=canonical(federated) if federated else "",
    )
    if isinstance(target, selectors.Target):
        spec.target.CopyFrom(selector_to_proto(target))
        if legacy_json:
            spec.target_json = target_json(target)
    else:
        spec.target_json = json.dumps(dict(target or {}), sort_keys=True)
    if isinstance(resources, _Resources):
        spec.resources.CopyFrom(resources_to_proto(resources))
        if legacy_json:
            spec.resources_json = resources_json(resources)
    else:
        spec.resources_json = json.dumps(dict(resources or {}), sort_keys=True)
    if isinstance(rollout, staging.Rollout):
        spec.rollout.CopyFrom(rollout_to_proto(rollout))
        if legacy_json:
            spec.rollout_json = rollout_json(rollout)
    elif rollout:
        spec.rollout_json = json.dumps(dict(rollout), sort_keys=True)
    return spec


def target_of(spec: pb.ReleaseSpec) -> selectors.Target:
    """The release's target: the typed field, else the deprecated JSON one."""
    if spec.HasField("target"):
        return target_from_proto(spec.target)
    return target_from_json(spec.target_json)


def resources_of(spec: pb.ReleaseSpec) -> resources.Resources:
    if spec.HasField("resources"):
        return resources_from_proto(spec.resources)
    return resources.parse_resources(parse_object(spec.resources_json, field="resources"))


def rollout_of(spec: pb.ReleaseSpec) -> staging.Rollout | None:
    if spec.HasField("rollout"):
        return rollout_from_proto(spec.rollout)
    return staging.parse_rollout(parse_object(spec.rollout_json, field="rollout"))
