"""MLTask spec validation: the schema's rules plus the ones across fields.

The API server already enforces the CRD's OpenAPI schema, but the operator
checks everything again (a spec may come from an emulator, an older CRD, or
`kubectl apply --validate=false`), then adds the rules no OpenAPI schema can
say: stage percents that increase and end at 100, an interval trigger that
names its interval, selector operators with the right number of values.

Every problem is reported with the path of the offending field, in the form a
user can find in their YAML: `spec.rollout.stages[1].percent: must be greater
than the previous stage's 50`. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pydantic

from tether.common import errors
from tether.operator.model import (
    DIGEST_PATTERN,
    MLTaskSpec,
    SelectorOperator,
    TriggerType,
)

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
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
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
            return f"must be of the form sha256:<64 lowercase hex digits>, got {got!r}"
        return f"must match the pattern {ctx.get('pattern')}, got {got!r}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {
            "greater_than_equal": "at least",
            "greater_than": "greater than",
            "less_than_equal": "at most",
            "less_than": "less than",
        }[kind]
        bound = next(iter(ctx.values()))
        return f"must be {words} {bound}, got {got!r}"
    if kind in ("enum", "literal_error"):
        return f"must be one of {ctx.get('expected')}, got {got!r}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s)"
    if kind == "string_too_short":
        return f"must be at least {ctx.get('min_length')} character(s) long"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters long"
    msg = str(err["msg"])
    return f"{msg[:1].lower()}{msg[1:]}, got {got!r}"


# ------------------------------------------------------------------ semantics


def semantic_issues(spec: MLTaskSpec) -> Iterator[Issue]:
    yield from _trigger_issues(spec)
    yield from _target_issues(spec)
    yield from _rollout_issues(spec)


def _trigger_issues(spec: MLTaskSpec) -> Iterator[Issue]:
    trigger = spec.trigger
    if trigger.type == TriggerType.INTERVAL and trigger.interval_seconds is None:
        yield Issue(f"{ROOT}.trigger.intervalSeconds", "is required when trigger.type is interval")
    if trigger.type != TriggerType.INTERVAL and trigger.interval_seconds is not None:
        yield Issue(
            f"{ROOT}.trigger.intervalSeconds", f"is only allowed when trigger.type is interval, not {trigger.type}"
        )


def _target_issues(spec: MLTaskSpec) -> Iterator[Issue]:
    for i, expr in enumerate(spec.target.match_expressions):
        field = f"{ROOT}.target.matchExpressions[{i}].values"
        if expr.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN):
            if not expr.values:
                yield Issue(field, f"must list at least one value for operator {expr.operator}")
            elif len(set(expr.values)) != len(expr.values):
                yield Issue(field, "must not repeat a value")
        elif expr.values:
            yield Issue(field, f"must be empty for operator {expr.operator}")


def _rollout_issues(spec: MLTaskSpec) -> Iterator[Issue]:
    stages = spec.rollout.stages
    for i in range(1, len(stages)):
        previous, current = stages[i - 1].percent, stages[i].percent
        if current <= previous:
            yield Issue(
                f"{ROOT}.rollout.stages[{i}].percent",
                f"must be greater than the previous stage's {previous}, got {current}",
            )
    if stages and stages[-1].percent != 100:
        yield Issue(
            f"{ROOT}.rollout.stages[{len(stages) - 1}].percent",
            f"the last stage must reach 100 percent, got {stages[-1].percent}",
        )
