"""Why an install failed, and whether trying again can help: the agent's one classification. Pure: no I/O.

An install that cannot succeed must not be retried forever, and one that
may succeed on the next try must not be given up on. Every failure of a
release's install goes through `classify` once (the coordinator,
`tether.agent.daemon`), and what it answers decides everything after:

- `REFUSED`: the version itself is unusable here: tampered or unsigned,
  an invalid or conflicting manifest, a policy the agent cannot honour, a
  model no engine runs, over one of the agent's own limits. Reported
  `REFUSED` once with the reason, remembered in `state.json`, not tried
  again until the release announces another version.
- `FAILED`: this device cannot install it as things stand: a permission
  problem on the store, a read-only filesystem, a name the filesystem will
  not take. Reported `FAILED` once with the reason and not tried again for
  that version until another version is announced or the agent restarts
  (an operator may fix the store meanwhile).
- `OVER_BUDGET`: the disk budget; its own rules (`tether.agent.convergence`:
  tried again when space may have been freed).
- `RETRY`: anything else, notably the network (gRPC UNAVAILABLE, a broken
  stream, a timeout), a disk momentarily full, too many open files, a bug:
  tried again with backoff, reporting nothing.

`convergence.plan` reads the verdicts it is given (a permanent one idles the
release), so the loop never decides on its own.
"""

from __future__ import annotations

import dataclasses
import enum
import errno

from tether.agent import diskbudget
from tether.common import errors

MAX_REASON_CHARS = 500  # kept in state.json and deliveries.message


class Outcome(enum.StrEnum):
    REFUSED = "refused"
    FAILED = "failed"
    OVER_BUDGET = "overBudget"
    RETRY = "retry"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Verdict:
    """What to do about one failure, and the reason to report."""

    outcome: Outcome
    reason: str

    @property
    def permanent(self) -> bool:
        """Trying the same version again cannot help (REFUSED or FAILED)."""
        return self.outcome in (Outcome.REFUSED, Outcome.FAILED)


# OSError numbers that the same install will meet again however often it is tried.
PERMANENT_ERRNOS = frozenset(
    {
        errno.EACCES,  # permission denied
        errno.EPERM,  # operation not permitted
        errno.EROFS,  # read-only filesystem
        errno.ENAMETOOLONG,  # a name the filesystem will not take
        errno.ELOOP,  # a symlink loop in the store's path
        errno.ENOTDIR,  # a file where the store needs a directory
        errno.EISDIR,  # a directory where the store needs a file
        errno.EXDEV,  # the store spans filesystems (renames cannot be atomic)
    }
)

# Refusals of the version itself (subclasses included: DigestMismatch, backends.ModelUnusable).
REFUSING_ERRORS: tuple[type[errors.TetherError], ...] = (
    errors.VerificationFailed,  # tampered, unsigned, untrusted, a model that runs nowhere
    errors.InvalidManifest,  # malformed or conflicting paths (also found when placing files)
    errors.InvalidSpec,  # a trigger or resources the agent cannot honour
    errors.DigestMismatch,  # bytes that are not what the signed manifest says
    errors.TooLarge,  # over one of the agent's own limits
)


def classify(error: BaseException) -> Verdict:
    """The verdict on one install failure (see the module docstring for the table)."""
    if isinstance(error, diskbudget.DiskBudgetExceeded):
        return Verdict(outcome=Outcome.OVER_BUDGET, reason=_reason(str(error)))
    if isinstance(error, REFUSING_ERRORS):
        return Verdict(outcome=Outcome.REFUSED, reason=_reason(str(error)))
    if isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS:
        return Verdict(outcome=Outcome.FAILED, reason=_reason(_describe_os_error(error)))
    return Verdict(outcome=Outcome.RETRY, reason=_reason(f"{type(error).__name__}: {error}"))


def _describe_os_error(error: OSError) -> str:
    code = errno.errorcode.get(error.errno or 0, str(error.errno))
    what = error.strerror or str(error)
    where = "" if error.filename is None else f" at {errors.excerpt(str(error.filename), limit=200)}"
    return f"cannot install on this device: {what} ({code}){where}"


def _reason(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."
