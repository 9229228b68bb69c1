"""Configuration from the environment (docs/internals.md lists the variables).

One frozen value per process, built once at start-up: environment first, then
explicit overrides (CLI flags). Nothing reads `os.environ` later, so tests can
build a config without touching the process environment.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from tether.common import errors

DEFAULT_LISTEN = "0.0.0.0:7443"
DEFAULT_CONTROLLER = "127.0.0.1:7443"
DEFAULT_BLOB_DIR = "./tether-blobs"
MIN_TOKEN_LEN = 8

ENV_DATABASE_URL = "TETHER_DATABASE_URL"
ENV_BROKER_URL = "TETHER_BROKER_URL"
ENV_TUNNEL_URL = "TETHER_TUNNEL_URL"
ENV_CONTROLLER = "TETHER_CONTROLLER"
ENV_ADMIN_TOKEN = "TETHER_ADMIN_TOKEN"
ENV_BOOTSTRAP_TOKEN = "TETHER_BOOTSTRAP_TOKEN"
ENV_BLOB_DIR = "TETHER_BLOB_DIR"
ENV_BLOB_STORE = "TETHER_BLOB_STORE"
ENV_BLOB_BASE_URL = "TETHER_BLOB_BASE_URL"
ENV_BLOB_URL_SECRET = "TETHER_BLOB_URL_SECRET"
ENV_BLOB_URL_TTL = "TETHER_BLOB_URL_TTL"
ENV_S3_ENDPOINT = "TETHER_S3_ENDPOINT"
ENV_S3_REGION = "TETHER_S3_REGION"
BLOB_STORE_KINDS = ("fs", "http")  # or s3://bucket[/prefix]


class ConfigError(errors.InvalidArgument):
    """A setting is missing or malformed; the message names the variable or flag."""


def split_host_port(value: str, *, field: str = "listen") -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port); port 0 means "pick a free one"."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{field}: {value!r} must be HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{field}: port {port} out of range")
    return host.strip("[]"), port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def controller_target(environ: Mapping[str, str] | None = None) -> str:
    """Where clients find the controller: TETHER_CONTROLLER or the local default."""
    env = os.environ if environ is None else environ
    return env.get(ENV_CONTROLLER) or DEFAULT_CONTROLLER


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    """Everything `tether.controller.server.start_controller` needs."""

    database_url: str
    admin_token: str
    bootstrap_token: str
    broker_url: str | None = None
    listen: str = DEFAULT_LISTEN
    blob_dir: pathlib.Path = pathlib.Path(DEFAULT_BLOB_DIR)
    max_blob_bytes: int = 2 * 1024**3
    # Where blobs live (tether.controller.blobstores): "fs" (blob_dir), "http" (blob_dir, served by a web
    # server or CDN under blob_base_url) or "s3://bucket[/prefix]" (an S3-compatible object store).
    blob_store: str = "fs"
    # Devices fetch blobs from here with signed per-device URLs (nginx secure_link); with s3://, a CDN
    # in front of the bucket (without it an object store hands out presigned GETs).
    blob_base_url: str | None = None
    blob_url_secret: str | None = None
    blob_url_ttl_s: int = 900  # lifetime of a blob URL handed to a device
    s3_endpoint_url: str | None = None  # e.g. MinIO or moto; None: AWS (or AWS_ENDPOINT_URL)
    s3_region: str | None = None  # None: botocore's (AWS_REGION, ~/.aws/config)
    # Largest gRPC message either way: results carry tensors, blobs travel in chunks.
    max_message_bytes: int = 20 * 1024 * 1024
    heartbeat_s: float = 30.0
    # Events buffered per connected device before it is dropped as too slow.
    device_queue_size: int = 64
    # Blob pulls streaming at once; more wait their turn in arrival order, each turn at most
    # `pull_quantum_bytes` (tether.controller.admission).
    max_concurrent_pulls: int = 64
    pull_quantum_bytes: int = 1024 * 1024
    # Installs per second a fan-out plans for: a change told to N devices at once asks them to
    # start pulling within N / pull_rate seconds (at most max_pull_spread_s); 0 = all at once.
    pull_rate: float = 500.0
    max_pull_spread_s: float = 120.0
    grace_s: float = 5.0
    pool_min_size: int = 1
    pool_max_size: int = 20
    tls_cert_file: pathlib.Path | None = None
    tls_key_file: pathlib.Path | None = None
    # mTLS: require every client to present a certificate signed by this CA.
    tls_client_ca_file: pathlib.Path | None = None
    # Device credentials (tether.common.credentials): signing keys from this file (one per
    # line, the first signs), else a key generated once and shared through Postgres.
    credential_key_file: pathlib.Path | None = None
    credential_ttl_s: int = 7 * 24 * 3600
    # How long an authenticated device stays cached. Revocation and changes of a device's credential
    # or facts do not wait for it (every replica hears of them through LISTEN/NOTIFY and forgets the
    # device at once); it bounds staleness only while a replica's LISTEN connection is down.
    auth_cache_s: float = 60.0
    # Bundle signatures checked at PutManifest (agents check their own trusted keys regardless).
    require_signed_bundles: bool = False
    trusted_key_files: tuple[pathlib.Path, ...] = ()
    # Prometheus /metrics (tether.controller.instruments): None = not served, 0 = a free port.
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    # A second, plaintext port serving only grpc.health.v1.Health (kubelet's `grpc:` probe speaks
    # no TLS): None = not served, 0 = a free port. The main port serves Health too.
    health_port: int | None = None
    # The real-time tunnel's broker (tether.controller.tunnel.brokers.open_broker): redis://..., another
    # scheme from the `tether.tunnel_brokers` entry points, or python:module:factory. None: no tunnel.
    tunnel_url: str | None = None

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ConfigError(f"database URL is required ({ENV_DATABASE_URL} or --database-url)")
        for name, env, value in (
            ("admin token", ENV_ADMIN_TOKEN, self.admin_token),
            ("bootstrap token", ENV_BOOTSTRAP_TOKEN, self.bootstrap_token),
        ):
            if not value or len(value) < MIN_TOKEN_LEN:
                raise ConfigError(f"{name} is required and must be at least {MIN_TOKEN_LEN} characters ({env})")
        split_host_port(self.listen)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("TLS needs both a certificate and a key file")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("mTLS (a client CA file) needs TLS: give --tls-cert and --tls-key too")
        if not 60 <= self.credential_ttl_s <= 366 * 24 * 3600:
            raise ConfigError(f"credential TTL must be between 60 s and 366 days, got {self.credential_ttl_s}")
        if self.pull_rate < 0 or self.max_pull_spread_s < 0:
            raise ConfigError("pull_rate and max_pull_spread_s must not be negative")
        if self.auth_cache_s < 0:
            raise ConfigError(f"auth_cache_s must be non-negative, got {self.auth_cache_s}")
        for name, number in (
            ("max_blob_bytes", self.max_blob_bytes),
            ("max_message_bytes", self.max_message_bytes),
            ("device_queue_size", self.device_queue_size),
            ("max_concurrent_pulls", self.max_concurrent_pulls),
            ("pull_quantum_bytes", self.pull_quantum_bytes),
            ("pool_max_size", self.pool_max_size),
        ):
            if number <= 0:
                raise ConfigError(f"{name} must be positive, got {number}")
        if self.heartbeat_s <= 0 or self.grace_s < 0:
            raise ConfigError("heartbeat_s must be positive and grace_s non-negative")
        if self.blob_store not in BLOB_STORE_KINDS and not self.blob_store.startswith("s3://"):
            raise ConfigError(
                f"blob store {self.blob_store!r} must be fs, http or s3://bucket[/prefix] ({ENV_BLOB_STORE})"
            )
        if self.blob_store == "http" and not self.blob_base_url:
            raise ConfigError(f"blob store http needs the base URL the blobs are served under ({ENV_BLOB_BASE_URL})")
        if self.blob_base_url and not self.blob_url_secret:
            raise ConfigError(f"a blob base URL needs the secret its URLs are signed with ({ENV_BLOB_URL_SECRET})")
        if not 60 <= self.blob_url_ttl_s <= 7 * 24 * 3600:
            raise ConfigError(f"blob URL TTL must be between 60 s and 7 days, got {self.blob_url_ttl_s}")
        if not 0 < self.pool_min_size <= self.pool_max_size:
            raise ConfigError("pool sizes must satisfy 0 < pool_min_size <= pool_max_size")

    @property
    def host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ControllerConfig:
        """Environment first, then `overrides` (a value of None means "not given")."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "database_url": env.get(ENV_DATABASE_URL, ""),
            "broker_url": env.get(ENV_BROKER_URL) or None,
            "admin_token": env.get(ENV_ADMIN_TOKEN, ""),
            "bootstrap_token": env.get(ENV_BOOTSTRAP_TOKEN, ""),
            "blob_dir": pathlib.Path(env.get(ENV_BLOB_DIR) or DEFAULT_BLOB_DIR),
            "blob_store": env.get(ENV_BLOB_STORE) or "fs",
            "blob_base_url": env.get(ENV_BLOB_BASE_URL) or None,
            "blob_url_secret": env.get(ENV_BLOB_URL_SECRET) or None,
            "s3_endpoint_url": env.get(ENV_S3_ENDPOINT) or None,
            "s3_region": env.get(ENV_S3_REGION) or None,
            "tunnel_url": env.get(ENV_TUNNEL_URL) or None,
        }
        if env.get(ENV_BLOB_URL_TTL):
            try:
                values["blob_url_ttl_s"] = int(env[ENV_BLOB_URL_TTL])
            except ValueError:
                raise ConfigError(f"{ENV_BLOB_URL_TTL} must be a number of seconds") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        if not isinstance(values["blob_dir"], pathlib.Path):
            values["blob_dir"] = pathlib.Path(values["blob_dir"])
        return cls(**values)

    def __repr__(self) -> str:  # tokens and URLs with passwords stay out of logs
        return f"ControllerConfig(listen={self.listen!r}, blob_dir={str(self.blob_dir)!r}, tokens=***)"
