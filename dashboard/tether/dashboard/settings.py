"""What the dashboard is told: where the controller and the Kubernetes API are, who may look, what it may do."""

from __future__ import annotations

import dataclasses
import pathlib

from tether.common import errors
from tether.common.tls import ClientTLS

DEFAULT_PORT = 8080
AUTH_MODES = ("token", "kubernetes")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    controller: str  # host:port of the controller's admin API
    admin_token: str = dataclasses.field(repr=False)
    token: str = dataclasses.field(repr=False)  # the dashboard's own access token (login form, bearer)
    # "token": log in with `token`; "kubernetes": with one's own Kubernetes bearer token, checked by the API
    # server (the user must be allowed to list the MLTasks shown), and controls are sent as that user.
    auth: str = "token"
    tls: ClientTLS | None = None
    kubeconfig: str | None = None  # None: $KUBECONFIG, ~/.kube/config, else the pod's service account
    namespaces: tuple[str, ...] = ()  # () = the credentials' namespace; ("*",) = every namespace
    allow_controls: bool = False  # rollout controls (pause, resume, promote, abort) on the task pages
    interval_s: float = 2.0  # one upstream poll per watched subject and interval
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    secure_cookies: bool = False  # set behind TLS (the chart's ingress)
    session_key: bytes | None = dataclasses.field(default=None, repr=False)  # replicas share it; None: made at start

    def __post_init__(self) -> None:
        if not self.admin_token:
            raise errors.InvalidArgument("admin token: required (--admin-token-file, TETHER_ADMIN_TOKEN)")
        if self.auth not in AUTH_MODES:
            raise errors.InvalidArgument(f"auth: {self.auth!r} is not one of {', '.join(AUTH_MODES)}")
        if len(self.token) < 16:
            raise errors.InvalidArgument(
                "dashboard token: at least 16 characters required (--token-file, TETHER_DASHBOARD_TOKEN)"
            )
        if not 0.2 <= self.interval_s <= 300:
            raise errors.InvalidArgument(f"interval: {self.interval_s} s is outside 0.2 to 300 s")


def read_secret(path: str | pathlib.Path, *, what: str) -> str:
    """A token from a file (a mounted Secret), stripped; a clear error naming `what` when unreadable or empty."""
    try:
        text = pathlib.Path(path).read_text().strip()
    except OSError as e:
        raise errors.InvalidArgument(f"{what}: cannot read {path}: {e.strerror}") from None
    if not text:
        raise errors.InvalidArgument(f"{what}: {path} is empty")
    return text
