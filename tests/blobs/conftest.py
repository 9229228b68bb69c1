"""Real blob servers for the blob tests: moto's S3 server and nginx from the distribution, on loopback ports."""

from __future__ import annotations

import pathlib
import secrets
from collections.abc import Iterator

import pytest

from tether.devtools import origin

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture()
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server (the real S3 HTTP API) on a free loopback port, with a bucket `tether-blobs`."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import boto3

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="tether-blobs")
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture()
def url_secret() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture()
def nginx_origin(tmp_path: pathlib.Path, url_secret: str) -> Iterator[origin.NginxOrigin]:
    """nginx serving `tmp_path/blobs` under /blobs/ to signed URLs only."""
    if origin.nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    root = tmp_path / "blobs"
    root.mkdir()
    server = origin.NginxOrigin(root=root, secret=url_secret, workdir=tmp_path / "nginx").start()
    try:
        yield server
    finally:
        server.stop()
