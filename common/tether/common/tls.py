"""TLS for the gRPC port, from PEM files: what clients trust and present, what the server serves.

Clients (agents, operator, `tether bundle` / `status` / `device`) use TLS as
soon as they are given a CA file (`--ca-file` / TETHER_CA_FILE); with a client
certificate and key as well (`--client-cert` / `--client-key`) they can talk
to a controller that requires mutual TLS. The controller serves TLS with
`--tls-cert` / `--tls-key` and, given `--tls-client-ca`, requires every client
to present a certificate signed by that CA (mTLS); `tether certs init` makes
all of these for a real install, `tether demo` makes them in its workdir.

Files are read once, when a channel or server is built: a missing or
unreadable file is a ConfigError naming the flag, not a handshake failure
later.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import click
import grpc

from tether.common import errors

ENV_CA_FILE = "TETHER_CA_FILE"
ENV_CLIENT_CERT = "TETHER_CLIENT_CERT"
ENV_CLIENT_KEY = "TETHER_CLIENT_KEY"
ENV_SERVER_NAME = "TETHER_TLS_SERVER_NAME"
ENV_TLS_CERT = "TETHER_TLS_CERT"
ENV_TLS_KEY = "TETHER_TLS_KEY"
ENV_TLS_CLIENT_CA = "TETHER_TLS_CLIENT_CA"
MAX_PEM_BYTES = 1024 * 1024


class TLSConfigError(errors.InvalidArgument):
    """A TLS file is missing, unreadable or not PEM; the message names it."""


def read_pem(path: str | os.PathLike[str], *, what: str) -> bytes:
    p = pathlib.Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{what} {p}: {e.strerror or e}") from None
    if len(data) > MAX_PEM_BYTES or b"-----BEGIN " not in data:
        raise TLSConfigError(f"{what} {p}: not a PEM file")
    return data


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientTLS:
    """How a client connects: plaintext (no CA file) or TLS, optionally with a client certificate."""

    ca_file: pathlib.Path | None = None
    cert_file: pathlib.Path | None = None
    key_file: pathlib.Path | None = None
    server_name: str | None = None  # verify the server's certificate for this name instead of the dialled host

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TLSConfigError("a client certificate needs both --client-cert and --client-key")
        if self.cert_file is not None and self.ca_file is None:
            raise TLSConfigError("a client certificate (mTLS) needs --ca-file too: TLS is off without it")

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ClientTLS:
        """Environment first, then `overrides` (None means "not given")."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "ca_file": env.get(ENV_CA_FILE) or None,
            "cert_file": env.get(ENV_CLIENT_CERT) or None,
            "key_file": env.get(ENV_CLIENT_KEY) or None,
            "server_name": env.get(ENV_SERVER_NAME) or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("ca_file", "cert_file", "key_file"):
            if values[key] is not None:
                values[key] = pathlib.Path(values[key])
        return cls(**values)

    def root_certificates(self) -> bytes | None:
        return None if self.ca_file is None else read_pem(self.ca_file, what="CA file")

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """None for plaintext; otherwise credentials trusting the CA (and presenting the client cert)."""
        if self.ca_file is None:
            return None
        key = chain = None
        if self.cert_file is not None and self.key_file is not None:
            chain = read_pem(self.cert_file, what="client certificate")
            key = read_pem(self.key_file, what="client key")
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates(), private_key=key, certificate_chain=chain
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if self.ca_file is not None and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def server_credentials(
    *, cert_file: pathlib.Path, key_file: pathlib.Path, client_ca_file: pathlib.Path | None = None
) -> grpc.ServerCredentials:
    """TLS server credentials; with `client_ca_file`, clients must present a certificate signed by it."""
    pair = (read_pem(key_file, what="TLS key"), read_pem(cert_file, what="TLS certificate"))
    if client_ca_file is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=read_pem(client_ca_file, what="client CA"), require_client_auth=True
    )


def client_options(f: Callable[..., Any] | None = None, *, server_name: bool = True) -> Any:
    """`--ca-file`, `--client-cert`, `--client-key` (and `--tls-server-name`) for a command that dials the controller.

    The command receives them as one `tls` keyword argument, a ClientTLS.
    Use as `@tls.client_options` or `@tls.client_options(server_name=False)`.
    """
    if f is None:
        return functools.partial(client_options, server_name=server_name)

    @functools.wraps(f)
    def wrapper(
        *args: Any,
        tls_ca_file: pathlib.Path | None,
        tls_client_cert: pathlib.Path | None,
        tls_client_key: pathlib.Path | None,
        tls_server_name: str | None = None,
        **kwargs: Any,
    ) -> Any:
        try:
            tls = ClientTLS(
                ca_file=tls_ca_file, cert_file=tls_client_cert, key_file=tls_client_key, server_name=tls_server_name
            )
        except errors.TetherError as e:
            raise click.UsageError(str(e)) from None
        return f(*args, tls=tls, **kwargs)

    path = click.Path(dir_okay=False, path_type=pathlib.Path)
    options: tuple[Callable[[Any], Any], ...] = (
        click.option(
            "--ca-file",
            "tls_ca_file",
            envvar=ENV_CA_FILE,
            type=path,
            help=f"PEM CA certificate(s) to trust: connect with TLS (env {ENV_CA_FILE}). Without it: plaintext.",
        ),
        click.option(
            "--client-cert",
            "tls_client_cert",
            envvar=ENV_CLIENT_CERT,
            type=path,
            help=f"PEM client certificate, for a controller that requires mTLS (env {ENV_CLIENT_CERT}).",
        ),
        click.option(
            "--client-key",
            "tls_client_key",
            envvar=ENV_CLIENT_KEY,
            type=path,
            help=f"PEM private key of --client-cert (env {ENV_CLIENT_KEY}).",
        ),
    )
    if server_name:
        options += (
            click.option(
                "--tls-server-name",
                "tls_server_name",
                envvar=ENV_SERVER_NAME,
                help=f"Verify the controller's certificate for this name, not the dialled host "
                f"(env {ENV_SERVER_NAME}).",
            ),
        )
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
