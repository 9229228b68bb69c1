"""The identifiers derived from an MLTask's namespace and name, a device id and a version, and their limits.

One MLTask becomes the release `<namespace>/<name>`; the agent derives file
names from it and the idempotency keys of its uploads from it, the device id
and the version; the rollout document salts cohorts with it. Each of those
meets a limit (Kubernetes' names, the controller's release pattern, a
filesystem's 255-byte file names, the controller's 128-character idempotency
keys). They are fixed here, once, so that every name Kubernetes accepts (a
namespace of 63 characters, a name of 253) is delivered end to end, and a
name that could not be is refused when the MLTask is applied.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse

from tether.common import errors

MAX_NAMESPACE_LEN = 63  # a DNS label
MAX_NAME_LEN = 253  # a DNS subdomain: the longest object name Kubernetes allows
MAX_RELEASE_LEN = MAX_NAMESPACE_LEN + 1 + MAX_NAME_LEN
MAX_DEVICE_ID_LEN = 128  # tether.common.auth.DEVICE_ID_RE
MAX_REQUEST_ID_LEN = 64  # on-demand runs' request ids
MAX_VERSION = 2**53  # versions travel as JSON numbers
MAX_IDEMPOTENCY_KEY_LEN = 128  # the controller's bound on UploadResult.idempotency_key
# Longest file name the agent makes from a name (filesystems allow 255 bytes; room for suffixes).
MAX_FILE_NAME = 200
_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_RE = re.compile(r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")
_HASHED = "%00"  # a percent-encoded name never holds it (NUL is refused), so hashed names are unambiguous


def release_name(namespace: str, name: str) -> str:
    """`<namespace>/<name>`, or `errors.InvalidSpec` naming `metadata.namespace` / `metadata.name`."""
    if not _NAMESPACE_RE.match(namespace) or len(namespace) > MAX_NAMESPACE_LEN:
        raise errors.InvalidSpec(
            f"{errors.excerpt(namespace)} must be a DNS label of at most {MAX_NAMESPACE_LEN} characters",
            field="metadata.namespace",
        )
    if not _NAME_RE.match(name) or len(name) > MAX_NAME_LEN:
        raise errors.InvalidSpec(
            f"{errors.excerpt(name)} must be a lowercase DNS subdomain of at most {MAX_NAME_LEN} characters",
            field="metadata.name",
        )
    return f"{namespace}/{name}"


def file_name(value: str) -> str:
    """A file name for `value` of at most MAX_FILE_NAME bytes, distinct for distinct values.

    The percent-encoded value when it fits (readable, and what older agents wrote), else
    `%00` and the value's sha256: the caller keeps the value itself where it needs it back.
    """
    quoted = urllib.parse.quote(value, safe="")
    if len(quoted) <= MAX_FILE_NAME:
        return quoted
    return _HASHED + hashlib.sha256(value.encode("utf-8")).hexdigest()


def is_hashed_file_name(name: str) -> bool:
    return name.startswith(_HASHED)


def idempotency_key(*, device_id: str, release: str, version: int, suffix: str) -> str:
    """The key of one run's upload: `<device>:<release>:<version>:<suffix>` when it fits the controller's bound.

    Otherwise `h-<sha256 of device and release, 32 hex>:<version>:<suffix>`, still unique per
    (device, release, version, suffix) and at most MAX_IDEMPOTENCY_KEY_LEN for any suffix of at
    most `demand-` + MAX_REQUEST_ID_LEN characters.
    """
    key = f"{device_id}:{release}:{version}:{suffix}"
    if len(key) <= MAX_IDEMPOTENCY_KEY_LEN:
        return key
    digest = hashlib.sha256(f"{device_id}\x00{release}".encode()).hexdigest()[:32]
    key = f"h-{digest}:{version}:{suffix}"
    if len(key) > MAX_IDEMPOTENCY_KEY_LEN:
        raise errors.InvalidArgument(f"idempotency key suffix {errors.excerpt(suffix)} is too long")
    return key
