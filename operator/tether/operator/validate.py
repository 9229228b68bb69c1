"""MLTask spec validation: the schema's rules plus the ones across fields.

The API server already enforces the CRD's OpenAPI schema, but the operator
checks everything again (a spec may come from an emulator, an older CRD, or
`kubectl apply --validate=false`), then adds the rules no OpenAPI schema can
say: stage percents that increase and end at 100, an interval trigger that
names its interval, a cron schedule that parses, a pattern an agent can
match (with the agents' own parser, `tether.spec.triggers`), selectors the
controller accepts (with its own parser, `tether.spec.selectors`: operators
with the right number of values, version ranges, exclusions and cohorts that
do not select everything), and federated round rules the controller can run
(`tether.spec.federation`: quorum, strategy parameters, privacy, stopOn).

Every problem is reported with the path of the offending field, in the form a
user can find in their YAML: `spec.rollout.stages[1].percent: must be greater
than the previous stage's 50`. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pydantic

from tether.common import errors
from tether.operator.model import (
    DIGEST_PATTERN,
    GATE_METRICS,
    TASK_METRIC_PREFIX,
    MLTaskSpec,
    Selector,
    Target,
    TriggerType,
)
from tether.spec import selectors, staging, triggers

RATE_METRICS = frozenset({"successRate", "errorRate", "notReportingRate"})
# Kubernetes' rules for label keys and values (apimachinery validation.IsQualifiedName / IsValidLabelValue).
LABEL_NAME_MAX = 63
LABEL_PREFIX_MAX = 253
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Tether's pseudo attributes (`tether.io/backend: mnn/cpu`, device ids) are not Kubernetes labels: their
# values follow the controller's rules, not these.
PSEUDO_PREFIX = "tether.io/"

ROOT = "spec"


@dataclasses.dataclass(frozen=True)
class Issue:
    field: str  # e.g. "spec.rollout.stages[1].percent"
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SpecInvalid(errors.InvalidSpec):
    """An MLTask spec with one or more problems; `field` names the first, `issues` holds all."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        assert issues, "SpecInvalid needs at least one issue"
        first = issues[0]
        more = "".join(f"; {i}" for i in issues[1:])
        super().__init__(first.message + more, field=first.field)
        self.issues = tuple(issues)


def validate(spec: Mapping[str, Any] | None) -> MLTaskSpec:
    """The typed spec, or `SpecInvalid` (an `errors.InvalidSpec`) naming every problem found."""
    issues = list(schema_issues(spec))
    if issues:
        raise SpecInvalid(issues)
    typed = MLTaskSpec.model_validate(spec)
    issues = list(semantic_issues(typed))
    if issues:
        raise SpecInvalid(issues)
    return typed


# ------------------------------------------------------------------ schema


def schema_issues(spec: Mapping[str, Any] | None) -> Iterator[Issue]:
    if not isinstance(spec, Mapping):
        yield Issue(ROOT, "is required and must be an object")
        return
    try:
        MLTaskSpec.model_validate(dict(spec))
    except pydantic.ValidationError as e:
        for err in e.errors(include_url=False):
            yield Issue(field_path(err["loc"]), _message(err))


def field_path(loc: Sequence[int | str], root: str = ROOT) -> str:
    """("rollout", "stages", 1, "percent") -> "spec.rollout.stages[1].percent"."""
    path = root
    for part in loc:  # a map key is input: quoted in part when long
        path += f"[{part}]" if isinstance(part, int) else f".{_key(part)}"
    return path


def _message(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == DIGEST_PATTERN:
            return f"must be of the form sha256:<64 lowercase hex digits>, got {errors.excerpt(got)}"
        return f"must match the pattern {ctx.get('pattern')}, got {errors.excerpt(got)}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {
            "greater_than_equal": "at least",
            "greater_than": "greater than",
            "less_than_equal": "at most",
            "less_than": "less than",
        }[kind]
        bound = next(iter(ctx.values()))
        return f"must be {words} {bound}, got {errors.excerpt(got)}"
    if kind in ("enum", "literal_error"):
        return f"must be one of {ctx.get('expected')}, got {errors.excerpt(got)}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s)"
    if kind == "string_too_short":
        return f"must be at least {ctx.get('min_length')} character(s) long"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters long"
    msg = str(err["msg"])
    return f"{msg[:1].lower()}{msg[1:]}, got {errors.excerpt(got)}"


# ------------------------------------------------------------------ semantics


def semantic_issues(spec: MLTaskSpec) -> Iterator[Issue]:
    yield from _trigger_issues(spec)
    yield from _target_issues(spec)
    yield from _rollout_issues(spec)
    yield from _federated_issues(spec)


# Trigger fields that belong to one type: (CRD field, attribute, type).
_TYPED_TRIGGER_FIELDS = (
    ("intervalSeconds", "interval_seconds", TriggerType.INTERVAL),
    ("schedule", "schedule", TriggerType.CRON),
    ("timezone", "timezone", TriggerType.CRON),
    ("pattern", "pattern", TriggerType.PATTERN),
    ("cooldownSeconds", "cooldown_seconds", TriggerType.PATTERN),
)
_REQUIRED_TRIGGER_FIELDS = {
    TriggerType.INTERVAL: ("intervalSeconds", "interval_seconds"),
    TriggerType.CRON: ("schedule", "schedule"),
    TriggerType.PATTERN: ("pattern", "pattern"),
}
# The agents' trigger document names a field differently from the CRD.
_AGENT_FIELDS = {"trigger.seconds": "trigger.intervalSeconds"}


def _trigger_issues(spec: MLTaskSpec) -> Iterator[Issue]:
    """Fields that belong to the trigger's type, then the agents' own parser (cron syntax, patterns, windows)."""
    trigger = spec.trigger
    base = f"{ROOT}.trigger"
    found = False
    required = _REQUIRED_TRIGGER_FIELDS.get(trigger.type)
    if required is not None and getattr(trigger, required[1]) is None:
        found = True
        yield Issue(f"{base}.{required[0]}", f"is required when trigger.type is {trigger.type}")
    for name, attr, kind in _TYPED_TRIGGER_FIELDS:
        if trigger.type != kind and getattr(trigger, attr) is not None:
            found = True
            yield Issue(f"{base}.{name}", f"is only allowed when trigger.type is {kind}, not {trigger.type}")
    if found:
        return
    try:  # exactly what an agent of this version will accept (tether.spec.triggers, shared with it)
        triggers.Trigger.from_doc(trigger.agent_document())
    except errors.InvalidSpec as e:
        field = _AGENT_FIELDS.get(e.field, e.field or "trigger")
        yield Issue(f"{ROOT}.{field}", str(e).removeprefix(f"{e.field}: "))


def _target_issues(spec: MLTaskSpec) -> Iterator[Issue]:
    """The shared grammar's verdict (tether.spec.selectors, the controller's too), then the CRD's own rules."""
    field = f"{ROOT}.target"
    shared = list(_shared(lambda: spec.target.parsed(field=field)))
    yield from shared
    yield from _repeats(spec.target, field=field)
    if not shared:  # Kubernetes' label rules on top of the grammar's (one report per problem)
        yield from _label_issues(spec.target, field=field)
    for i, sel in enumerate(spec.target.exclude):
        yield from _repeats(sel, field=f"{field}.exclude[{i}]")
        if not shared:
            yield from _label_issues(sel, field=f"{field}.exclude[{i}]")


def _cohort_issues(cohort: Selector, *, field: str) -> Iterator[Issue]:
    shared = list(_shared(lambda: staging.parse_cohort(cohort.document(), field=field, keyed=selectors.dotted)))
    yield from shared
    yield from _repeats(cohort, field=field)
    if not shared:
        yield from _label_issues(cohort, field=field)


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a Kubernetes label key (`[prefix/]name`), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > LABEL_PREFIX_MAX or not _DNS_SUBDOMAIN.match(prefix)):
        return (
            f"key {errors.excerpt(key)}: its prefix must be a lowercase DNS subdomain of at most"
            f" {LABEL_PREFIX_MAX} characters"
        )
    if not name or len(name) > LABEL_NAME_MAX or not _LABEL_NAME.match(name):
        return (
            f"key {errors.excerpt(key)}: its name must be 1-{LABEL_NAME_MAX} letters, digits, '-', '_' or '.',"
            " beginning and ending with a letter or digit (Kubernetes label rules)"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why `value` is not a Kubernetes label value, or None."""
    if value and (len(value) > LABEL_NAME_MAX or not _LABEL_NAME.match(value)):
        return (
            f"value {errors.excerpt(value)} must be at most {LABEL_NAME_MAX} letters, digits, '-', '_' or '.',"
            " beginning and ending with a letter or digit (Kubernetes label rules)"
        )
    return None


def _label_issues(sel: Selector | Target, *, field: str) -> Iterator[Issue]:
    """Keys and values of a selector checked against Kubernetes' label rules (pseudo attributes' values excepted)."""
    for key, value in sel.match_labels.items():
        where = selectors.dotted(f"{field}.matchLabels", _key(key))
        problem = label_key_problem(key) or (None if key.startswith(PSEUDO_PREFIX) else label_value_problem(value))
        if problem:
            yield Issue(where, problem)
    for i, expr in enumerate(sel.match_expressions):
        where = f"{field}.matchExpressions[{i}]"
        if problem := label_key_problem(expr.key):
            yield Issue(f"{where}.key", problem)
        elif not expr.key.startswith(PSEUDO_PREFIX):
            for j, value in enumerate(expr.values):
                if problem := label_value_problem(value):
                    yield Issue(f"{where}.values[{j}]", problem)
    for key in sel.match_versions:
        if problem := label_key_problem(key):
            yield Issue(selectors.dotted(f"{field}.matchVersions", _key(key)), problem)


def _key(key: str) -> str:
    """A map key as a field path names it: whole when short, else quoted in part."""
    return key if len(key) <= errors.MAX_EXCERPT_CHARS else errors.excerpt(key)


def _shared(parse: Callable[[], object]) -> Iterator[Issue]:
    """The first problem the shared parser finds, as an issue."""
    try:
        parse()
    except errors.InvalidSpec as e:
        yield Issue(e.field, str(e).removeprefix(f"{e.field}: "))


def _repeats(sel: Selector | Target, *, field: str) -> Iterator[Issue]:
    """Values and device ids listed twice: harmless to the grammar, but a sign of a mistake in a spec."""
    for i, expr in enumerate(sel.match_expressions):
        if len(set(expr.values)) != len(expr.values):
            yield Issue(f"{field}.matchExpressions[{i}].values", "must not repeat a value")
    if len(set(sel.device_ids)) != len(sel.device_ids):
        yield Issue(f"{field}.deviceIds", "must not repeat a device id")


def _rollout_issues(spec: MLTaskSpec) -> Iterator[Issue]:
    """Stages must grow: percents and counts increase, cohort-only stages come first, the last reaches 100 %."""
    stages = spec.rollout.stages
    base = f"{ROOT}.rollout.stages"
    last_percent: int | None = None
    last_count: int | None = None
    sized_seen = False
    names: dict[str, int] = {}
    cohorts: dict[str, int] = {}
    for i, stage in enumerate(stages):
        where = f"{base}[{i}]"
        if stage.percent is not None and stage.count is not None:
            yield Issue(where, "has both percent and count; a stage is sized by one of them")
        if stage.percent is None and stage.count is None and stage.cohort is None:
            yield Issue(where, "needs a percent, a count or a cohort")
        if stage.name is not None:
            if stage.name in names:
                yield Issue(f"{where}.name", f"repeats the name of stages[{names[stage.name]}]")
            names.setdefault(stage.name, i)
        if stage.cohort is not None:
            yield from _cohort_issues(stage.cohort, field=f"{where}.cohort")
            key = stage.cohort.model_dump_json()
            if key in cohorts and stage.percent is None and stage.count is None:
                yield Issue(f"{where}.cohort", f"overlaps stages[{cohorts[key]}]: it reaches no new device")
            cohorts.setdefault(key, i)
        if stage.percent is not None:
            if last_percent is not None and stage.percent <= last_percent:
                yield Issue(
                    f"{where}.percent",
                    f"must be greater than the previous stage's {last_percent}, got {stage.percent}",
                )
            last_percent = stage.percent
        if stage.count is not None:
            if last_count is not None and stage.count <= last_count:
                yield Issue(
                    f"{where}.count", f"must be greater than the previous stage's {last_count}, got {stage.count}"
                )
            if last_percent is not None:
                yield Issue(f"{where}.count", f"comes after a percent stage ({last_percent}); sizes must grow")
            last_count = stage.count
        if stage.percent is None and stage.count is None and sized_seen and stage.cohort is not None:
            yield Issue(f"{where}.cohort", "a cohort-only stage must come before the percent and count stages")
        sized_seen = sized_seen or stage.percent is not None or stage.count is not None
        yield from _gate_issues(stage.gates, field=f"{where}.gates")
    if stages and stages[-1].percent != 100:
        yield Issue(
            f"{base}[{len(stages) - 1}].percent",
            f"the last stage must reach 100 percent, got {stages[-1].percent}",
        )


def _federated_issues(spec: MLTaskSpec) -> Iterator[Issue]:
    """The shared parser's rules across `spec.federated` (tether.spec.federation, the controller's too)."""
    federated = spec.federated
    if federated is not None:
        yield from _shared(lambda: federated.parsed(field=f"{ROOT}.federated"))


def _gate_issues(gates: Sequence[Any], *, field: str) -> Iterator[Issue]:
    seen: set[str] = set()
    for j, gate in enumerate(gates):
        where = f"{field}[{j}]"
        metric = gate.metric
        task_metric = metric.startswith(TASK_METRIC_PREFIX) and len(metric) > len(TASK_METRIC_PREFIX)
        if metric not in GATE_METRICS and not task_metric:
            yield Issue(
                f"{where}.metric",
                f"{errors.excerpt(metric)} is not a known metric; use one of {', '.join(GATE_METRICS)} "
                f"or {TASK_METRIC_PREFIX}<name> for a metric the task reports",
            )
            continue
        if metric in seen:
            yield Issue(f"{where}.metric", f"{errors.excerpt(metric)} is gated twice in this stage")
        seen.add(metric)
        if gate.min is None and gate.max is None:
            yield Issue(where, "needs a min and/or a max")
        if gate.min is not None and gate.max is not None and gate.min > gate.max:
            yield Issue(where, f"min {gate.min} is greater than max {gate.max}: the gate can never pass")
        for bound in ("min", "max"):
            value = getattr(gate, bound)
            if value is None:
                continue
            if metric in RATE_METRICS and not 0 <= value <= 1:
                yield Issue(f"{where}.{bound}", f"{metric} is a rate between 0 and 1, got {value}")
            elif metric in ("devicesReporting", "p95LatencySeconds", "notReporting") and value < 0:
                yield Issue(f"{where}.{bound}", f"must be at least 0, got {value}")
        if metric == "devicesReporting" and gate.max is not None:
            yield Issue(f"{where}.max", "devicesReporting takes a min only")
