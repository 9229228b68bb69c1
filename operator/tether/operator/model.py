"""The MLTask custom resource as typed models: the single source of its schema.

Everything about the resource's shape lives here: field names (camelCase on
the wire, snake_case in Python), types, enums, bounds and the descriptions
that `kubectl explain` shows. The CRD YAML is generated from these models
(`python -m tether.operator.crd`), so the schema the API server enforces and
the one the operator parses cannot drift apart.

Only *structural* rules belong here (types, enums, bounds, patterns), because
only those can be expressed in the CRD's OpenAPI schema; the CRD's bounds are
tighter than (or equal to) what the controller accepts. The grammar itself
(selector operators and their values, version ranges, exclusions, triggers)
is the shared one of `tether.spec`: `Target.parsed`, `Selector.parsed` and
`Resources.parsed` hand a value to it and return its typed value. Rules across
fields (stage percents increase, an interval trigger names its interval) live
in `validate.py`, which reports them with the path of the offending field.
The status half of the schema is `tether.operator.task_status`.

Pure: pydantic and the shared spec package (tether.spec), no I/O.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import pydantic

from tether.operator.camel import CamelModel
from tether.operator.federated import Federated
from tether.spec import cron, resources, selectors, staging, streams

GROUP = "tether.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MLTask"
PLURAL = "mltasks"
SINGULAR = "mltask"
SHORT_NAMES = ("mlt",)

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
# Kubernetes label keys: an optional DNS-subdomain prefix and a name of at most 63 characters.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
MAX_STAGES = 20
MAX_EXPRESSIONS = 32
MAX_VALUES = 256
MAX_TIMEOUT_SECONDS = 24 * 3600
MAX_INTERVAL_SECONDS = 30 * 24 * 3600


# ------------------------------------------------------------------ spec


class Bundle(CamelModel):
    """The content-addressed bundle (manifest) that this task runs."""

    digest: Annotated[str, pydantic.Field(pattern=DIGEST_PATTERN)] = pydantic.Field(
        description="Digest of the bundle's canonical manifest, `sha256:<64 lowercase hex digits>`, "
        "as printed by `tether bundle build`. The controller must already hold this manifest.",
    )


class TriggerType(enum.StrEnum):
    """When a device runs an installed task (the trigger types agents accept: tether.spec.triggers)."""

    ON_INSTALL = "onInstall"
    INTERVAL = "interval"
    CRON = "cron"
    ON_DEMAND = "onDemand"
    PATTERN = "pattern"


class PatternStep(CamelModel):
    """One step of an event-sequence pattern: an event of this type (and page) meeting the conditions."""

    type: str = pydantic.Field(
        min_length=1, description="The event type the step matches, e.g. `page_view` or `add_to_cart`."
    )
    page: str | None = pydantic.Field(
        default=None, description="The page (or scene) the event must have happened on; any page when unset."
    )
    where: dict[str, Any] | None = pydantic.Field(
        default=None,
        max_length=streams.MAX_CONDITIONS,
        description="Conditions on the event's attributes (or its `key`): `{attr: value}` means equality, "
        "`{attr: {op: value}}` uses one of `eq`, `ne`, `in`, `notIn` (a list), `gt`, `gte`, `lt`, `lte` "
        "(a number), `exists` (true or false), `prefix` (a string).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class Pattern(CamelModel):
    """An ordered sequence of on-device events that fires a `pattern` trigger when it completes."""

    steps: list[PatternStep] = pydantic.Field(
        min_length=1,
        max_length=streams.MAX_STEPS,
        description="The events to match, in order (other events may come in between).",
    )
    within: float | None = pydantic.Field(
        default=None,
        ge=0,
        le=streams.MAX_WITHIN_S,
        description=f"Seconds from the first step's event to the last one's; defaults to "
        f"{streams.MAX_WITHIN_S} (seven days).",
    )


class StreamWindow(CamelModel):
    """The on-device events a run receives in `ctx.inputs["events"]`: the latest ones up to when it fires."""

    seconds: float | None = pydantic.Field(
        default=None,
        gt=0,
        le=streams.MAX_WINDOW_SECONDS,
        description="A time window: the events of the last this many seconds. Give `seconds`, `count` or both.",
    )
    count: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=streams.MAX_WINDOW_EVENTS,
        description="A count window: the last this many events (within `seconds` when both are given).",
    )
    types: list[Annotated[str, pydantic.Field(min_length=1)]] | None = pydantic.Field(
        default=None, min_length=1, description="Only events of these types; every type when unset."
    )


AggregateOp = Literal["count", "sum", "mean", "min", "max"]


class StreamAggregation(CamelModel):
    """Per-group statistics over the window's events, handed to the run in `ctx.inputs["aggregates"]`."""

    name: str | None = pydantic.Field(
        default=None,
        min_length=1,
        description="The key of the result in `ctx.inputs['aggregates']`; defaults to `by_<by>`.",
    )
    by: str = pydantic.Field(
        min_length=1, description="What events are grouped by: `type`, `page`, `key` or an attribute name."
    )
    value: str | None = pydantic.Field(
        default=None,
        min_length=1,
        description="The numeric attribute that `sum`, `mean`, `min` and `max` are computed over.",
    )
    ops: list[AggregateOp] | None = pydantic.Field(
        default=None,
        min_length=1,
        description="Statistics per group: `count`, `sum`, `mean`, `min`, `max`; `[count]` when unset.",
    )


class Trigger(CamelModel):
    """When a device runs the task once it is installed (the controller can also run it on demand)."""

    type: TriggerType = pydantic.Field(
        default=TriggerType.ON_INSTALL,
        description="`onInstall`: run once, right after the task is installed. "
        "`interval`: run every `intervalSeconds`. `cron`: run on the cron `schedule` (in `timezone`). "
        "`onDemand`: run only when the controller asks (TriggerRun). "
        "`pattern`: run when the device's event stream matches `pattern`.",
    )
    interval_seconds: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=MAX_INTERVAL_SECONDS,
        description="Seconds between runs; required when `type` is `interval`, not allowed otherwise.",
    )
    schedule: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=cron.MAX_EXPRESSION_LEN,
        description="A five-field cron expression (`minute hour day-of-month month day-of-week`, with ranges, "
        "steps, lists, month and weekday names, or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`), "
        "e.g. `0 3 * * *`; required when `type` is `cron`, not allowed otherwise. Runs missed while a device "
        "is off are not made up.",
    )
    timezone: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=64,
        description="The IANA time zone the cron `schedule` is evaluated in, e.g. `Europe/Berlin`; `UTC` when "
        "unset. Only with `type: cron`.",
    )
    pattern: Pattern | None = pydantic.Field(
        default=None,
        description="The event sequence that fires the task; required when `type` is `pattern`, "
        "not allowed otherwise. The run receives the matching events in `ctx.inputs['match']`.",
    )
    cooldown_seconds: float | None = pydantic.Field(
        default=None,
        ge=0,
        le=streams.MAX_COOLDOWN_S,
        description="Minimum seconds between two runs fired by the pattern; only with `type: pattern`.",
    )
    window: StreamWindow | None = pydantic.Field(
        default=None,
        description="The on-device events each run receives in `ctx.inputs['events']` (any trigger type).",
    )
    aggregate: list[StreamAggregation] | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=streams.MAX_AGGREGATIONS,
        description="Statistics over the `window`'s events each run receives in `ctx.inputs['aggregates']`; "
        "needs a `window`. Names must be unique.",
    )
    conditions: Conditions | None = pydantic.Field(
        default=None,
        description="Participation conditions: a device runs the task only while all that are true hold, "
        "evaluated against the state the device reports (a state it cannot tell does not hold it back).",
    )

    def agent_document(self) -> dict[str, Any]:
        """The trigger as agents read it in `trigger_json` (`tether.spec.triggers`): only what is set."""
        doc: dict[str, Any] = {"type": str(self.type)}
        if self.interval_seconds is not None:
            doc["seconds"] = self.interval_seconds
        if self.schedule is not None:
            doc["schedule"] = self.schedule
        if self.timezone is not None:
            doc["timezone"] = self.timezone
        if self.pattern is not None:
            doc["pattern"] = self.pattern.to_json()
        if self.cooldown_seconds is not None:
            doc["cooldownSeconds"] = self.cooldown_seconds
        if self.window is not None:
            doc["window"] = self.window.to_json()
        if self.aggregate is not None:
            doc["aggregate"] = [a.to_json() for a in self.aggregate]
        conditions = self.conditions
        if conditions is not None and (conditions.charging or conditions.unmetered_network or conditions.idle):
            doc["conditions"] = {k: v for k, v in conditions.to_json().items() if v}
        return doc


class Conditions(CamelModel):
    """Device states required before a device runs the task."""

    charging: bool = pydantic.Field(default=False, description="Run only while the device is charging.")
    unmetered_network: bool = pydantic.Field(
        default=False, description="Run only while the device is on an unmetered network (e.g. Wi-Fi)."
    )
    idle: bool = pydantic.Field(default=False, description="Run only while the device is idle.")


class MatchExpression(CamelModel):
    """One requirement on a device attribute, as in Kubernetes label selectors."""

    key: str = pydantic.Field(
        min_length=1,
        max_length=316,
        pattern=LABEL_KEY_PATTERN,
        description="The device attribute the requirement applies to, e.g. `os` or `tether.dev/tier`.",
    )
    operator: selectors.Operator = pydantic.Field(
        description="`In`/`NotIn`: the attribute's value is (not) one of `values`. "
        "`Exists`/`DoesNotExist`: the device has (does not have) the attribute.",
    )
    values: list[Annotated[str, pydantic.Field(max_length=256)]] = pydantic.Field(
        default_factory=list,
        max_length=MAX_VALUES,
        description="Values for `In` and `NotIn` (at least one); must be empty for `Exists` and `DoesNotExist`.",
    )


class Selector(CamelModel):
    """A set of devices: all given requirements must hold (used by cohorts and exclusions)."""

    match_labels: dict[str, Annotated[str, pydantic.Field(max_length=256)]] = pydantic.Field(
        default_factory=dict, max_length=64, description="Device attributes that must equal the given values."
    )
    match_expressions: list[MatchExpression] = pydantic.Field(
        default_factory=list, max_length=MAX_EXPRESSIONS, description="Further requirements on device attributes."
    )
    match_versions: dict[str, Annotated[str, pydantic.Field(max_length=256)]] = pydantic.Field(
        default_factory=dict,
        max_length=16,
        description="Version ranges by attribute, e.g. `{appVersion: '>=10.2,<11'}`: the attribute must be a "
        "version inside the range (operators >=, >, <=, <, ==, !=, comma-separated clauses all hold).",
    )
    device_ids: list[Annotated[str, pydantic.Field(max_length=256)]] = pydantic.Field(
        default_factory=list, max_length=10_000, description="Explicit device ids (an explicit cohort)."
    )

    def document(self) -> dict[str, Any]:
        """The selector in the shared grammar's document form (tether.spec.selectors), empty parts left out."""
        return _selector_document(self)

    def parsed(self, *, field: str) -> selectors.Target:
        """The selector as the shared type; `errors.InvalidSpec` names the field (keys written `a.b`)."""
        return selectors.parse_selector(self.document(), field=field, keyed=selectors.dotted)


class Target(CamelModel):
    """Which devices the task is for: all requirements must hold (an empty target matches every device)."""

    match_labels: dict[str, Annotated[str, pydantic.Field(max_length=256)]] = pydantic.Field(
        default_factory=dict,
        max_length=64,
        description="Device attributes that must equal the given values, e.g. `{os: android}`.",
    )
    match_expressions: list[MatchExpression] = pydantic.Field(
        default_factory=list,
        max_length=MAX_EXPRESSIONS,
        description="Further requirements on device attributes; all must hold.",
    )
    match_versions: dict[str, Annotated[str, pydantic.Field(max_length=256)]] = pydantic.Field(
        default_factory=dict,
        max_length=16,
        description="Version ranges by attribute, e.g. `{appVersion: '>=10.2,<11'}`.",
    )
    device_ids: list[Annotated[str, pydantic.Field(max_length=256)]] = pydantic.Field(
        default_factory=list, max_length=10_000, description="Only these devices (an explicit cohort), when given."
    )
    exclude: list[Selector] = pydantic.Field(
        default_factory=list,
        max_length=16,
        description="Devices matching any of these selectors are never targeted.",
    )

    def document(self) -> dict[str, Any]:
        """The target in the shared grammar's document form (tether.spec.selectors), empty parts left out."""
        doc = _selector_document(self)
        if self.exclude:
            doc["exclude"] = [s.document() for s in self.exclude]
        return doc

    def parsed(self, *, field: str = "spec.target") -> selectors.Target:
        """The target as the shared type; `errors.InvalidSpec` names the field (keys written `a.b`)."""
        return selectors.parse_target(self.document(), field=field, keyed=selectors.dotted)


def _selector_document(sel: Selector | Target) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if sel.match_labels:
        doc["matchLabels"] = dict(sel.match_labels)
    if sel.match_expressions:
        doc["matchExpressions"] = [
            {"key": e.key, "operator": str(e.operator), "values": list(e.values)} for e in sel.match_expressions
        ]
    if sel.match_versions:
        doc["matchVersions"] = dict(sel.match_versions)
    if sel.device_ids:
        doc["deviceIds"] = list(sel.device_ids)
    return doc


GATE_METRICS = (
    "devicesReporting",
    "successRate",
    "errorRate",
    "p95LatencySeconds",
    "notReporting",
    "notReportingRate",
)
# Gates on devices that stopped talking: judged however few devices report (the others wait for a sample).
SILENCE_METRICS = ("notReporting", "notReportingRate")
TASK_METRIC_PREFIX = "task."


class GateFailureAction(enum.StrEnum):
    """What a failed health gate does to the rollout."""

    PAUSE = "Pause"
    ROLLBACK = "Rollback"


class Gate(CamelModel):
    """A health gate: a bound on one metric of the stage's devices at the new version."""

    metric: str = pydantic.Field(
        min_length=1,
        max_length=128,
        description="`devicesReporting` (devices that finished a run), `successRate` and `errorRate` (0 to 1, "
        "among devices reporting), `p95LatencySeconds` (of run durations), or `task.<name>` for the mean of a "
        "metric the task reports, e.g. `task.accuracy`; `notReporting` (devices told about the version that have "
        "said nothing for longer than `spec.rollout.reportDeadlineSeconds`) or `notReportingRate` (that share of "
        "the devices told), usually with a `max`.",
    )
    min: float | None = pydantic.Field(default=None, description="The metric must be at least this.")
    max: float | None = pydantic.Field(default=None, description="The metric must be at most this.")


class Stage(CamelModel):
    """One step of a staged rollout: who it reaches, how long it bakes, and the gates it must pass."""

    name: str | None = pydantic.Field(
        default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", description="A name, e.g. `beta`."
    )
    percent: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=100,
        description="Share of the targeted devices (by stable hash of the device id) that this stage reaches, "
        "1 to 100. Percents must increase from stage to stage and the last stage must be 100.",
    )
    count: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=100_000_000,
        description="Number of targeted devices this stage reaches (instead of a percent); counts must increase.",
    )
    cohort: Selector | None = pydantic.Field(
        default=None,
        description="An explicit cohort (e.g. beta testers by label, or device ids) this stage always reaches; "
        "a stage with only a cohort reaches just those devices.",
    )
    bake_seconds: int = pydantic.Field(
        default=0, ge=0, le=MAX_INTERVAL_SECONDS, description="How long the stage runs before it may pass."
    )
    gates: list[Gate] = pydantic.Field(
        default_factory=list, max_length=16, description="Health gates the stage must pass (all of them)."
    )
    on_gate_failure: GateFailureAction = pydantic.Field(
        default=GateFailureAction.PAUSE,
        description="`Pause` the rollout, or `Rollback` every device to the previous version, when a gate fails.",
    )


class Rollout(CamelModel):
    """How the task reaches the targeted devices: in stages, each reaching a larger share."""

    stages: list[Stage] = pydantic.Field(
        default_factory=lambda: [Stage(percent=100)],
        min_length=1,
        max_length=MAX_STAGES,
        description="Ordered rollout stages; the default is a single stage of 100 percent.",
    )
    report_deadline_seconds: int | None = pydantic.Field(
        default=None,
        ge=staging.MIN_REPORT_DEADLINE_S,
        le=staging.MAX_REPORT_DEADLINE_S,
        description="Seconds a device told about a new version may stay silent (no report) before it counts as "
        "not reporting in the stage's health and status; `notReporting` / `notReportingRate` gates bound it. "
        f"Default {staging.DEFAULT_REPORT_DEADLINE_S}.",
    )
    salt: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Salt of the stable cohort hash; defaults to `<namespace>/<name>`, so every task picks its "
        "own cohorts and one task always picks the same devices.",
    )


class Aggregation(CamelModel):
    """How the cloud combines what the devices upload for one round."""

    tensors: Literal["weightedMean", "mean", "sum"] = pydantic.Field(
        default="weightedMean",
        description="How uploaded tensors are combined: `weightedMean` (by sample count, FedAvg), `mean` or `sum`.",
    )
    metrics: Literal["weightedMean", "mean"] = pydantic.Field(
        default="weightedMean",
        description="How uploaded metrics are combined: `weightedMean` (by sample count) or `mean`.",
    )
    counts: Literal["sum"] = pydantic.Field(
        default="sum",
        description="How uploaded counters are combined: `sum`.",
    )


class Resources(CamelModel):
    """Limits on one run of the task on a device."""

    timeout_seconds: int = pydantic.Field(
        default=300,
        ge=1,
        le=MAX_TIMEOUT_SECONDS,
        description="Wall-clock limit of one run, in seconds; the run is stopped and reported failed beyond it.",
    )
    memory_mb: int = pydantic.Field(
        default=512,
        ge=16,
        le=64 * 1024,
        alias="memoryMB",
        description="Memory limit of the task's worker process, in MiB.",
    )
    cpu_seconds: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=MAX_TIMEOUT_SECONDS,
        description="CPU-time limit of one run, in seconds; unlimited (only the timeout applies) when unset.",
    )

    def parsed(self) -> resources.Resources:
        """The limits as the shared type (tether.spec.resources); the CRD's bounds are within the wire's."""
        return resources.Resources(
            timeout_seconds=self.timeout_seconds, memory_mb=self.memory_mb, cpu_seconds=self.cpu_seconds
        )


class MLTaskSpec(CamelModel):
    """The desired state of an ML task: what runs, where, when, and how results are combined."""

    bundle: Bundle = pydantic.Field(description="The bundle to run.")
    trigger: Trigger = pydantic.Field(default_factory=Trigger, description="When devices run the task.")
    target: Target = pydantic.Field(
        default_factory=Target, description="Which devices receive the task; empty means all enrolled devices."
    )
    rollout: Rollout = pydantic.Field(default_factory=Rollout, description="How the task is rolled out.")
    aggregation: Aggregation = pydantic.Field(
        default_factory=Aggregation, description="How uploaded results are aggregated."
    )
    resources: Resources = pydantic.Field(default_factory=Resources, description="Per-run limits on the device.")
    paused: bool = pydantic.Field(
        default=False, description="Stop notifying further devices; devices that have the task keep it."
    )
    federated: Federated | None = pydantic.Field(
        default=None,
        description="Run the task as federated learning: rounds of sampled devices whose model updates the cloud "
        "aggregates into the next global model. Unset: a plain task whose results are aggregated per version.",
    )


# ------------------------------------------------------------------ printer columns

PRINTER_COLUMNS: tuple[dict[str, str], ...] = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Summary of the task's state."},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage", "description": "Current rollout stage."},
    {"name": "Targeted", "type": "integer", "jsonPath": ".status.targeted", "description": "Devices targeted."},
    {"name": "Installed", "type": "integer", "jsonPath": ".status.installed", "description": "Devices installed."},
    {"name": "Succeeded", "type": "integer", "jsonPath": ".status.succeeded", "description": "Devices succeeded."},
    {"name": "Failed", "type": "integer", "jsonPath": ".status.failed", "description": "Devices failed."},
    {
        "name": "Round",
        "type": "integer",
        "jsonPath": ".status.federated.round",
        "description": "Current federated round.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp", "description": "Age of the task."},
)
