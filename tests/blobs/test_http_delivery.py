"""Devices pull from where the bytes are: an nginx origin by signed URL, and past hostile caches to gRPC.

Real agents, a real controller (gRPC on loopback, PostgreSQL), nginx from the
distribution, and a hostile "CDN" (a raw asyncio HTTP server that misbehaves on
purpose). Whatever a URL serves, a device installs only bytes matching the
digests of the signed manifest; a URL that fails in any way falls back to
PullBlobs, and the bytes installed are the bundle's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import secrets

import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN
from security.sec_helpers import query, until, write_bundle

from tether.agent import bundles, client, daemon, httpfetch, pull
from tether.common import admin_client, url_failures
from tether.controller import blob_urls, blobs, blobstores

FAST = client.Backoff(initial_s=0.05, max_s=0.3)
RELEASE = "default/cdn-task"
MODEL = os.urandom(700_000)


def make_agent(address, root, name, *, stall_s=5.0) -> daemon.Agent:
    return daemon.Agent(
        controller=address,
        state_dir=root / name / "state",
        data_dir=root / name / "data",
        bootstrap_token=BOOTSTRAP_TOKEN,
        device_id=name,
        attributes={"os": "android"},
        backends=["mnn/cpu"],
        backoff=FAST,
        rng=random.Random(0),
        http_settings=httpfetch.HttpSettings(stall_s=stall_s, connect_s=2.0),
    )


def pulled_bytes(controller) -> int:
    return sum(m.response_bytes for m in controller.counters.snapshot() if m.method.endswith(("PullBlobs", "PullBlob")))


async def publish_and_wait(controller, agents, tmp_path, database_url):
    directory, bundle = write_bundle(tmp_path / "bundle", extra={"model.bin": MODEL})
    runs = [asyncio.create_task(a.run()) for a in agents]
    try:
        async with admin_client.AdminClient(target=controller.address, token=ADMIN_TOKEN) as adm:
            await adm.upload_bundle(directory, bundle)
            await until(lambda: _all(a.connected.is_set() for a in agents))
            await adm.apply_release(
                release=RELEASE, manifest_digest=bundle.digest, target={"matchLabels": {"os": "android"}}
            )

            async def settled() -> bool:
                rows = query(database_url, "SELECT state FROM deliveries WHERE release = %s", RELEASE)
                return sorted(rows) == [("succeeded",)] * len(agents)

            await until(settled, timeout=60)
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*runs)
    return bundle


async def _all(values) -> bool:
    return all(values)


async def test_devices_install_from_the_nginx_origin_by_their_own_signed_urls(
    nginx_origin, url_secret, controller_config, start, tmp_path, database_url
):
    cfg = dataclasses.replace(
        controller_config,
        blob_dir=nginx_origin.root,
        blob_store="http",
        blob_base_url=nginx_origin.base_url,
        blob_url_secret=url_secret,
    )
    controller = await start(cfg)
    agents = [make_agent(controller.address, tmp_path, f"phone-{i}") for i in range(2)]
    bundle = await publish_and_wait(controller, agents, tmp_path, database_url)
    model = bundle.file("model.bin").sha256
    for a in agents:
        assert a.store.blob_path(model).read_bytes() == MODEL
        assert a.puller.http.fetched == len({f.sha256 for f in bundle.files}) and a.puller.http.failures == 0
    assert pulled_bytes(controller) == 0  # not one blob byte through the controller
    log = nginx_origin.access_log()
    assert "device=phone-0" in log and "device=phone-1" in log  # each device its own URL
    assert " 200 " in log


async def test_a_partial_download_resumes_from_the_origin_with_a_range_request(nginx_origin, url_secret, tmp_path):
    backend = blobstores.LocalBackend(
        blobs.FilesystemBlobStore(nginx_origin.root),
        signer=blob_urls.OriginSigner(base_url=nginx_origin.base_url, secret=url_secret),
    )
    digest = "sha256:" + __import__("hashlib").sha256(MODEL).hexdigest()

    async def one():
        yield MODEL

    await backend.put_stream(digest, one())
    store = bundles.BundleStore(tmp_path / "device")
    sink = pull.FileSink(store)
    first = sink.open(digest, size=len(MODEL))
    first.append(MODEL[:300_000], offset=0)
    first.close()  # interrupted after 300,000 bytes
    fetcher = httpfetch.HttpFetcher()
    try:
        await fetcher.fetch(
            backend.url_for(digest, device_id="phone-0", now=__import__("time").time()),
            sink.open(digest, size=len(MODEL)),
        )
    finally:
        await fetcher.close()
    assert store.blob_path(digest).read_bytes() == MODEL
    assert " 206 " in nginx_origin.access_log()


# ---------------------------------------------------------------- a hostile cache in front of the blobs


class HostileCdn:
    """Serves the controller's blob directory, misbehaving as `mode` says."""

    def __init__(self, root, mode: str) -> None:
        self.root = root
        self.mode = mode
        self.requests = 0
        self._server: asyncio.base_events.Server | None = None
        self._stalled: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/blobs/"

    async def stop(self) -> None:
        for w in self._stalled:
            w.close()
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        self.requests += 1
        path = head.split(" ")[1].split("?")[0]
        data = (self.root / path.removeprefix("/blobs/")).read_bytes() if self.mode != "404" else b""
        size = len(data)
        if self.mode == "404":
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        elif self.mode in ("expired", "forged"):
            status = b"410 Gone" if self.mode == "expired" else b"403 Forbidden"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        elif self.mode == "redirect loop":
            writer.write(
                f"HTTP/1.1 302 Found\r\nLocation: {path}?again={self.requests}\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
        else:
            body = os.urandom(size) if self.mode == "wrong bytes" else data
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
            if self.mode in ("truncated", "stall"):
                writer.write(body[: size // 2])
                await writer.drain()
                if self.mode == "stall":
                    self._stalled.append(writer)  # never another byte, never closed (until the test ends)
                    return
            else:
                writer.write(body)
        await writer.drain()
        writer.close()


REASONS = {
    "wrong bytes": url_failures.WRONG_BYTES,
    "truncated": url_failures.TRUNCATED,
    "stall": url_failures.STALLED,
    "404": url_failures.NOT_FOUND,
    "redirect loop": url_failures.REDIRECTS,
    "expired": url_failures.EXPIRED,
    "forged": url_failures.FORBIDDEN,
}


@pytest.mark.parametrize("mode", list(REASONS))
async def test_a_hostile_or_broken_cache_is_refused_and_the_device_falls_back_to_grpc(
    mode, controller_config, start, tmp_path, database_url
):
    cdn = HostileCdn(controller_config.blob_dir, mode)
    base_url = await cdn.start()
    backend = blobstores.LocalBackend(
        blobs.FilesystemBlobStore(controller_config.blob_dir, max_blob_bytes=controller_config.max_blob_bytes),
        signer=blob_urls.OriginSigner(base_url=base_url, secret=secrets.token_urlsafe(20)),
    )
    try:
        controller = await start(controller_config, blob_store=backend)
        agents = [make_agent(controller.address, tmp_path, "phone-0", stall_s=0.5)]
        bundle = await publish_and_wait(controller, agents, tmp_path, database_url)
    finally:
        await cdn.stop()
    agent = agents[0]
    model = bundle.file("model.bin").sha256
    assert cdn.requests >= 1  # the URL was tried
    assert agent.puller.http.fetched == 0 and agent.puller.http.failures >= 1
    assert agent.store.blob_path(model).read_bytes() == MODEL  # what is installed is the bundle's bytes
    assert agent.store.current(RELEASE) == 1
    # ... and came through PullBlobs: all of it, or (a body cut short) the rest, resumed from the partial
    resumed = mode in ("truncated", "stall")
    assert (
        len(MODEL) // 2 <= pulled_bytes(controller) < len(MODEL) if resumed else pulled_bytes(controller) >= len(MODEL)
    )
    assert not list(agent.state_dir.rglob("*.part"))
    # ... and the controller was told why the URL failed, once: with the install's report, acknowledged.
    assert controller.metrics is not None
    told = controller.metrics.registry.get_sample_value(
        "tether_controller_blob_url_failures_total", {"reason": REASONS[mode]}
    )
    assert told == agent.puller.http.failures
    assert agent.reporter.url_failures == {}


async def test_two_replicas_on_one_database_and_one_object_store_give_devices_the_same_answers(
    s3_endpoint, controller_config, start, tmp_path, database_url
):
    cfg = dataclasses.replace(
        controller_config, blob_store="s3://tether-blobs/fleet", s3_endpoint_url=s3_endpoint, s3_region="us-east-1"
    )
    # Separate blob directories: nothing is shared but PostgreSQL and the bucket.
    first = await start(dataclasses.replace(cfg, blob_dir=tmp_path / "replica-1"))
    second = await start(dataclasses.replace(cfg, blob_dir=tmp_path / "replica-2"))
    assert first.blob_backend.shared and second.blob_backend.shared
    agents = [
        make_agent(first.address, tmp_path, "phone-0"),  # uploaded and applied through the first replica
        make_agent(second.address, tmp_path, "phone-1"),  # hears of it through the second
    ]
    bundle = await publish_and_wait(first, agents, tmp_path, database_url)
    model = bundle.file("model.bin").sha256
    for a in agents:
        assert a.store.blob_path(model).read_bytes() == MODEL
        assert a.puller.http.fetched == len({f.sha256 for f in bundle.files}) and a.puller.http.failures == 0
    assert pulled_bytes(first) == pulled_bytes(second) == 0  # presigned GETs straight from the object store
    async with (
        admin_client.AdminClient(target=first.address, token=ADMIN_TOKEN) as one,
        admin_client.AdminClient(target=second.address, token=ADMIN_TOKEN) as two,
    ):
        a = await one.get_release_status(RELEASE)
        b = await two.get_release_status(RELEASE)
        assert (a.version, a.succeeded, a.targeted) == (b.version, b.succeeded, b.targeted) == (1, 2, 2)
