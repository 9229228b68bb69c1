"""Release specs as the controller accepts them: validation and change detection.

The operator sends target, resources and the rollout document as typed
messages (older clients: JSON documents), trigger and aggregation as JSON
documents; all are validated here, once, with the parsers of `tether.spec`,
before anything is stored. `content_changed` decides whether an
apply bumps the release version: only the manifest and the policy documents
count, never the MLTask generation or the pause flag, so re-applying an
unchanged MLTask notifies nobody.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from tether.common import errors, manifest
from tether.controller import rollouts
from tether.proto.v1 import tether_pb2 as pb
from tether.spec import federation, selectors, staging, triggers, wire

# "<namespace>/<name>": a Kubernetes namespace (DNS label) and object name (DNS subdomain).
RELEASE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$")
MAX_POLICY_BYTES = wire.MAX_DOCUMENT_BYTES
TENSOR_AGGREGATIONS = frozenset({"weightedMean", "mean", "sum"})
METRIC_AGGREGATIONS = frozenset({"weightedMean", "mean"})
COUNT_AGGREGATIONS = frozenset({"sum"})
MAX_INTERVAL_SECONDS = triggers.MAX_INTERVAL_S  # what agents accept (tether.spec.triggers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReleaseSpec:
    release: str
    generation: int
    manifest_digest: str
    target: Mapping[str, Any]
    trigger: Mapping[str, Any]
    aggregation: Mapping[str, Any]
    paused: bool = False
    resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # The operator's rollout decision (tether.controller.rollouts), normalised; {} = no staging.
    rollout: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # spec.federated as the operator sent it (tether.spec.federation); {} = not federated.
    federated: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # A federated release's bundle as the operator sent it; `manifest_digest` is then the current round's
    # (the base with the global model file replaced, derived by the controller). "" when not federated.
    base_manifest: str = ""

    def rules(self) -> federation.Federation | None:
        """The parsed round rules (validated when the spec was accepted), None when not federated."""
        return federation.parse_federation(self.federated or None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Release:
    """A stored release: its spec, the controller-side version, and the parsed target.

    With a rollout, also the parsed decision, the stage thresholds fixed so far
    and the stable version that devices outside the current stage keep.
    """

    spec: ReleaseSpec
    version: int
    deleted: bool = False
    target: selectors.Target = dataclasses.field(default_factory=selectors.Target, compare=False)
    rollout: staging.Rollout | None = dataclasses.field(default=None, compare=False)
    rollout_state: rollouts.RolloutState = dataclasses.field(default_factory=rollouts.RolloutState)
    stable: rollouts.Stable | None = dataclasses.field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.spec.release

    @property
    def manifest_digest(self) -> str:
        return self.spec.manifest_digest

    @property
    def paused(self) -> bool:
        return self.spec.paused

    def targets(self, facts: selectors.Facts) -> bool:
        """The target matches the device (pause does not matter: results and reports stay welcome)."""
        return not self.deleted and self.target.matches(facts)

    def offered_to(self, facts: selectors.Facts, *, delivered: bool) -> bool:
        """Whether the device should have this release installed.

        A paused release stops spreading: it stays with devices that already
        got it (pausing is not a rollback, so nothing is uninstalled) but is
        not offered to devices that never had it.
        """
        return self.targets(facts) and (not self.paused or delivered)


def check_release_name(release: str, *, field: str = "release") -> str:
    if not isinstance(release, str) or not RELEASE_RE.match(release):
        raise errors.InvalidSpec(f"{release!r} must be '<namespace>/<name>' in lowercase DNS form", field=field)
    return release


REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_request_id(request_id: str) -> str:
    """An on-demand request id ("" means: generate one)."""
    if request_id and not REQUEST_ID_RE.match(request_id):
        raise errors.InvalidArgument(f"request_id {request_id!r} must match {REQUEST_ID_RE.pattern}")
    return request_id


def parse_payload(payload_json: str) -> dict[str, Any]:
    """The JSON object an on-demand run hands its task (`ctx.inputs["payload"]`); bounded like a policy."""
    return wire.parse_object(payload_json, field="payload")


def parse_spec(
    *,
    release: str,
    generation: int,
    manifest_digest: str,
    target_json: str,
    trigger_json: str,
    aggregation_json: str,
    paused: bool,
    resources_json: str = "",
    rollout_json: str = "",
    federated_json: str = "",
) -> ReleaseSpec:
    """Validate a ReleaseSpec given as JSON documents (the deprecated wire form); see `spec_from_proto`."""
    return spec_from_proto(
        pb.ReleaseSpec(
            release=release,
            generation=generation,
            manifest_digest=manifest_digest,
            target_json=target_json,
            trigger_json=trigger_json,
            aggregation_json=aggregation_json,
            paused=paused,
            resources_json=resources_json,
            rollout_json=rollout_json,
            federated_json=federated_json,
        )
    )


def spec_from_proto(message: pb.ReleaseSpec) -> ReleaseSpec:
    """Validate a ReleaseSpec from the wire; `errors.InvalidSpec` names the field.

    Target, resources and rollout come from their typed fields, or from the
    deprecated JSON ones when a client older than those sent none
    (`tether.spec.wire`); either way the shared parsers of `tether.spec` decide.
    """
    check_release_name(message.release)
    if message.generation < 0:
        raise errors.InvalidSpec(f"must be >= 0, got {message.generation}", field="generation")
    if not manifest.DIGEST_RE.match(message.manifest_digest):
        raise errors.InvalidSpec(
            f"{message.manifest_digest!r} is not of the form sha256:<64 hex digits>", field="manifest_digest"
        )
    target = wire.target_of(message)
    trigger = wire.parse_object(message.trigger_json, field="trigger")
    aggregation = wire.parse_object(message.aggregation_json, field="aggregation")
    check_trigger(trigger)
    check_aggregation(aggregation)
    limits = wire.resources_of(message)
    rollout = wire.rollout_of(message)
    federated = wire.parse_object(message.federated_json, field="federated")
    if federated:
        federation.parse_federation(federated, field="federated")
    return ReleaseSpec(
        release=message.release,
        generation=message.generation,
        manifest_digest=message.manifest_digest,
        target=dict(target.document),
        trigger=trigger,
        aggregation=aggregation,
        paused=message.paused,
        resources=limits.to_json(),
        rollout={} if rollout is None else rollout.to_json(),
        federated=federated,
    )


def effective_spec(previous: Release | None, incoming: ReleaseSpec) -> ReleaseSpec:
    """What an apply stores: for a federated release, the round's manifest survives a re-apply of its base.

    The operator sends the bundle it knows (the base). While that base is
    unchanged the release keeps the manifest of its latest round, so an
    unchanged MLTask neither resets the global model nor bumps the version; a
    new base replaces it (and starts the run afresh). The controller's own
    apply of a round's manifest names the base explicitly (`base_manifest`).
    """
    if not incoming.federated:
        return dataclasses.replace(incoming, base_manifest="")
    if incoming.base_manifest:
        return incoming
    base = incoming.manifest_digest
    if (
        previous is not None
        and not previous.deleted
        and previous.spec.federated
        and previous.spec.base_manifest == base
    ):
        return dataclasses.replace(incoming, manifest_digest=previous.spec.manifest_digest, base_manifest=base)
    return dataclasses.replace(incoming, base_manifest=base)


def check_trigger(trigger: Mapping[str, Any]) -> None:
    """A trigger an agent of this version can honour: the agents' own parser (`tether.spec.triggers`).

    Every type agents run is accepted (onInstall, interval, cron, onDemand,
    pattern, with stream windows, aggregations and participation conditions);
    errors name the field (`trigger.schedule`, `trigger.pattern.steps[0].type`).
    """
    if not trigger:
        return  # the agent's default (run on install)
    kind = trigger.get("type")
    if not isinstance(kind, str) or not kind:
        raise errors.InvalidSpec("must name a non-empty string type", field="trigger.type")
    if kind not in triggers.TYPES:
        raise errors.InvalidSpec(f"{kind!r} is not one of {list(triggers.TYPES)}", field="trigger.type")
    triggers.Trigger.from_doc(trigger)


def check_aggregation(aggregation: Mapping[str, Any], *, field: str = "aggregation") -> None:
    """The documented keys must carry a supported method; other keys pass to the worker untouched."""
    for key, allowed in (
        ("tensors", TENSOR_AGGREGATIONS),
        ("metrics", METRIC_AGGREGATIONS),
        ("counts", COUNT_AGGREGATIONS),
    ):
        if key in aggregation and aggregation[key] not in allowed:
            raise errors.InvalidSpec(f"{aggregation[key]!r} is not one of {sorted(allowed)}", field=f"{field}.{key}")


def content_changed(old: ReleaseSpec, new: ReleaseSpec) -> bool:
    """Whether devices must hear about `new`: manifest or policy differ (generation and pause do not count)."""
    return (
        old.manifest_digest != new.manifest_digest
        or _canonical(old.target) != _canonical(new.target)
        or _canonical(old.trigger) != _canonical(new.trigger)
        or _canonical(old.aggregation) != _canonical(new.aggregation)
        or _canonical(old.resources) != _canonical(new.resources)
        or _canonical(old.federated) != _canonical(new.federated)
    )


def policy_json(doc: Mapping[str, Any]) -> str:
    """A policy document as it travels to agents (DesiredTask): canonical JSON, "" when empty (the default)."""
    return _canonical(doc) if doc else ""


def _canonical(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))
