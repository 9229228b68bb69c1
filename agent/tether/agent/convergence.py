"""What a release's loop does next: decide-then-act for one release on one device. Pure: no I/O.

Each release has its own loop in the agent (`tether.agent.daemon`). Every
pass it describes what it knows as frozen values — the desired version, what
is installed, a version refused for good, a version refused for the disk
budget, the time — and `plan` answers with exactly one step; the loop
performs it and asks again. Keeping the decision apart from the acting means
the order of the rules is visible in one function and tested as a table,
like the operator's `decide()` (`tether.operator.reconcile`).

The rules, in order:
1. Nothing desired: uninstall what is there, then the loop ends.
2. The desired version was refused (tampered, unusable policy, any failure
   `tether.agent.failures.classify` calls REFUSED), or its install failed for
   good on this device (FAILED: a permission problem, an unusable name): nothing
   until the release announces another version (or, for FAILED, the agent
   restarts). Transient failures are not facts here: the loop retries them with
   backoff by planning the install again.
3. Its policy cannot be honoured here: refuse it before downloading anything.
4. Installed as desired: let the trigger decide whether to run.
5. Refused for the disk budget and the store has not changed (and was measured
   less than `OVER_BUDGET_RECHECK_S` ago): the refusal stands.
6. The controller spread the pull and this device's moment has not come (and
   the version is not kept on disk for a rollback): wait for it.
7. Otherwise install it (measuring the store again first when rule 5 let it
   through), then run.
"""

from __future__ import annotations

import dataclasses

from tether.agent import failures

# A version refused for the disk budget is tried again at least this often (space may free up meanwhile).
OVER_BUDGET_RECHECK_S = 60.0


# ---------------------------------------------------------------- what the loop knows


@dataclasses.dataclass(frozen=True, kw_only=True)
class Desired:
    """The version the controller wants on this device."""

    version: int
    manifest_digest: str
    policy_error: str | None = None  # why its trigger or resources cannot be honoured here
    pull_at: float | None = None  # when the controller's pull spread lets it start (monotonic)
    kept: bool = False  # this exact version is still on disk (a rollback switches back without downloading)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Installed:
    """What the device runs for the release (`manifest_digest` empty: files on disk the state does not know)."""

    version: int
    manifest_digest: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Refused:
    """A version refused for good (not retried until another version is announced)."""

    version: int | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Failed:
    """The last install failure of a version in this process, as `failures.classify` judged it."""

    version: int
    manifest_digest: str
    verdict: failures.Verdict


@dataclasses.dataclass(frozen=True, kw_only=True)
class Blocked:
    """A version refused for the disk budget, and when the store was last measured for it."""

    version: int
    manifest_digest: str
    measurable: bool  # its manifest is known, so the store can be measured for it again
    store_changed: bool  # installs or uninstalls ran since it was measured
    checked_at: float  # monotonic


# ---------------------------------------------------------------- the steps


@dataclasses.dataclass(frozen=True)
class Retire:
    """Nothing desired, nothing installed: the release's loop ends."""


@dataclasses.dataclass(frozen=True)
class Uninstall:
    """Nothing desired: remove the installed versions."""


@dataclasses.dataclass(frozen=True)
class Idle:
    """Nothing to do until the release is kicked (a refused version)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Refuse:
    """Refuse the desired version for good, with this reason."""

    reason: str


@dataclasses.dataclass(frozen=True)
class StillBlocked:
    """The disk-budget refusal stands: keep serving what is installed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WaitForTurn:
    """Wait until the pull spread's moment, then plan again."""

    until: float
    recheck_budget: bool = False  # measure the store first: a version that still does not fit stays refused


@dataclasses.dataclass(frozen=True, kw_only=True)
class Install:
    """Install the desired version, then run it on its trigger."""

    version: int
    recheck_budget: bool = False  # measure the store first: a version that still does not fit stays refused


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """Installed as desired: run it when its trigger says so."""

    version: int


Step = Retire | Uninstall | Idle | Refuse | StillBlocked | WaitForTurn | Install | Run


def plan(
    desired: Desired | None,
    installed: Installed | None,
    refused: Refused | None,
    blocked: Blocked | None,
    now: float,
    *,
    failed: Failed | None = None,
) -> Step:
    """The next step for one release (the rules are in the module docstring)."""
    if desired is None:
        return Uninstall() if installed is not None else Retire()
    if refused is not None and refused.version == desired.version:
        return Idle()
    if desired.policy_error is not None:
        return Refuse(reason=desired.policy_error)
    if installed is not None and (installed.version, installed.manifest_digest) == (
        desired.version,
        desired.manifest_digest,
    ):
        return Run(version=desired.version)
    if (
        failed is not None
        and failed.verdict.permanent
        and (failed.version, failed.manifest_digest) == (desired.version, desired.manifest_digest)
    ):
        return Idle()
    recheck = False
    if (
        blocked is not None
        and blocked.measurable
        and (blocked.version, blocked.manifest_digest) == (desired.version, desired.manifest_digest)
    ):
        if not blocked.store_changed and now - blocked.checked_at < OVER_BUDGET_RECHECK_S:
            return StillBlocked()
        recheck = True
    if desired.pull_at is not None and desired.pull_at > now and not desired.kept:
        return WaitForTurn(until=desired.pull_at, recheck_budget=recheck)
    return Install(version=desired.version, recheck_budget=recheck)
