"""Blob URLs on an HTTPS origin with a private CA: the agent's --ca-file is trusted for them too."""

from __future__ import annotations

import hashlib
import http.server
import os
import pathlib
import re
import ssl
import threading
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from tether.agent import bundles, httpfetch, pull
from tether.cli import agent_cmd
from tether.common import certs, errors

BLOB = os.urandom(200_000)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@pytest.fixture()
def https_origin(tmp_path: pathlib.Path) -> Iterator[tuple[str, pathlib.Path]]:
    """A real HTTPS server (the standard library's) whose certificate a private CA signed; (URL, CA file)."""
    ca = certs.init_ca_dir(tmp_path / "ca", hosts=("127.0.0.1",))
    root = tmp_path / "www"
    root.mkdir()
    (root / "blob").write_bytes(BLOB)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca.server_cert, ca.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/blob", ca.ca_cert
    finally:
        server.shutdown()
        server.server_close()


async def fetch(url: str, store_dir: pathlib.Path, settings: httpfetch.HttpSettings) -> bundles.BundleStore:
    store = bundles.BundleStore(store_dir)
    fetcher = httpfetch.HttpFetcher(settings)
    try:
        await fetcher.fetch(url, pull.FileSink(store).open(DIGEST, size=len(BLOB)))
    finally:
        await fetcher.close()
    return store


async def test_a_private_origin_is_trusted_through_the_ca_file(https_origin, tmp_path):
    url, ca_file = https_origin
    store = await fetch(url, tmp_path / "device", httpfetch.HttpSettings(ca_file=str(ca_file), connect_s=5))
    assert store.blob_path(DIGEST).read_bytes() == BLOB


async def test_without_the_ca_file_the_origin_is_a_url_failure_and_nothing_is_kept(https_origin, tmp_path):
    url, _ = https_origin
    with pytest.raises(httpfetch.HttpFailure, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await fetch(url, tmp_path / "device", httpfetch.HttpSettings(connect_s=5))
    assert not bundles.BundleStore(tmp_path / "device").has_blob(DIGEST)


def test_a_ca_file_that_is_not_a_certificate_is_an_error_at_start(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(errors.InvalidArgument, match=re.escape(str(bad))):
        httpfetch.HttpFetcher(httpfetch.HttpSettings(ca_file=str(bad)))


def test_agent_run_hands_its_ca_file_to_the_blob_fetcher(monkeypatch, https_origin, tmp_path):
    _, ca_file = https_origin
    seen = {}

    class Stop(Exception):
        pass

    def fake_agent(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr("tether.agent.daemon.Agent", fake_agent)
    result = CliRunner().invoke(
        agent_cmd.agent,
        ["run", "--controller", "127.0.0.1:1", "--bootstrap-token", "t", "--state-dir", str(tmp_path / "s"),
         "--ca-file", str(ca_file)],
    )  # fmt: skip
    assert isinstance(result.exception, Stop), result.output
    assert seen["http_settings"].ca_file == str(ca_file)
