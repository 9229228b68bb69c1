"""Process resource limits the long-running parts raise for themselves."""

from __future__ import annotations

import contextlib


def raise_open_files_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit (one descriptor per connection); the new soft limit.

    The soft limit is often far below the hard one; anything above the hard
    limit needs privileges this process is not assumed to have. -1 where the
    platform has no such limit.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
