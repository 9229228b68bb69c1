"""The per-release planner: one step from frozen facts (a table of cases, no agent, no I/O)."""

from __future__ import annotations

import pytest

from tether.agent import convergence as c

D = "sha256:" + "d" * 64
E = "sha256:" + "e" * 64
NOW = 1000.0
RECHECK = c.OVER_BUDGET_RECHECK_S


def desired(version: int = 2, digest: str = D, **kw: object) -> c.Desired:
    return c.Desired(version=version, manifest_digest=digest, **kw)  # type: ignore[arg-type]


def blocked(version: int = 2, digest: str = D, **kw: object) -> c.Blocked:
    facts: dict[str, object] = {"measurable": True, "store_changed": False, "checked_at": NOW - 1}
    facts.update(kw)
    return c.Blocked(version=version, manifest_digest=digest, **facts)  # type: ignore[arg-type]


V1 = c.Installed(version=1, manifest_digest=E)
V2 = c.Installed(version=2, manifest_digest=D)

CASES = [
    # (name, desired, installed, refused, blocked, expected step)
    ("nothing desired, nothing here: the loop ends", None, None, None, None, c.Retire()),
    ("nothing desired, a version here: uninstall", None, V1, None, None, c.Uninstall()),
    ("files on disk the state does not know: uninstall", None, c.Installed(version=3), None, None, c.Uninstall()),
    ("new version: install", desired(), V1, None, None, c.Install(version=2)),
    ("first version: install", desired(), None, None, None, c.Install(version=2)),
    ("installed as desired: run", desired(), V2, None, None, c.Run(version=2)),
    ("same version, other digest: install", desired(digest=E), V2, None, None, c.Install(version=2)),
    ("refused version: idle", desired(), V1, c.Refused(version=2), None, c.Idle()),
    ("refused an older version: install", desired(), V1, c.Refused(version=1), None, c.Install(version=2)),
    (
        "unusable policy: refuse before downloading",
        desired(policy_error="bad trigger"),
        V1,
        None,
        None,
        c.Refuse(reason="bad trigger"),
    ),
    ("refusal beats a bad policy", desired(policy_error="bad"), None, c.Refused(version=2), None, c.Idle()),
    (
        "bad policy of the installed version: refuse",
        desired(policy_error="bad"),
        V2,
        None,
        None,
        c.Refuse(reason="bad"),
    ),
    ("over budget, store unchanged: the refusal stands", desired(), V1, None, blocked(), c.StillBlocked()),
    (
        "over budget, store changed: measure again, then install",
        desired(),
        V1,
        None,
        blocked(store_changed=True),
        c.Install(version=2, recheck_budget=True),
    ),
    (
        "over budget, measured long ago: measure again",
        desired(),
        V1,
        None,
        blocked(checked_at=NOW - RECHECK),
        c.Install(version=2, recheck_budget=True),
    ),
    (
        "over budget, manifest unknown: install as usual",
        desired(),
        V1,
        None,
        blocked(measurable=False),
        c.Install(version=2),
    ),
    ("another version was over budget: install", desired(), V1, None, blocked(version=3), c.Install(version=2)),
    ("installed as desired beats a stale block", desired(), V2, None, blocked(), c.Run(version=2)),
    ("pull spread: wait for the moment", desired(pull_at=NOW + 5), V1, None, None, c.WaitForTurn(until=NOW + 5)),
    ("pull spread, moment passed: install", desired(pull_at=NOW - 1), V1, None, None, c.Install(version=2)),
    (
        "pull spread, kept for rollback: install now",
        desired(pull_at=NOW + 5, kept=True),
        V1,
        None,
        None,
        c.Install(version=2),
    ),
    (
        "pull spread after a stale block: measure first, then wait",
        desired(pull_at=NOW + 5),
        V1,
        None,
        blocked(store_changed=True),
        c.WaitForTurn(until=NOW + 5, recheck_budget=True),
    ),
    (
        "pull spread while still blocked: the refusal stands",
        desired(pull_at=NOW + 5),
        V1,
        None,
        blocked(),
        c.StillBlocked(),
    ),
    ("pull spread, installed already: run", desired(pull_at=NOW + 5), V2, None, None, c.Run(version=2)),
]


@pytest.mark.parametrize(
    ("desired_", "installed", "refused", "blocked_", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan(desired_, installed, refused, blocked_, expected) -> None:
    assert c.plan(desired_, installed, refused, blocked_, NOW) == expected


def test_steps_and_facts_are_frozen_values() -> None:
    step = c.plan(desired(), None, None, None, NOW)
    with pytest.raises(AttributeError):
        step.version = 3  # type: ignore[misc, union-attr]
    with pytest.raises(AttributeError):
        desired().version = 3  # type: ignore[misc]
