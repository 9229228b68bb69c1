"""Bundles that fail verification are refused by every device, every time, reported, and never run.

Real agents against the real controller (gRPC on loopback, PostgreSQL). Each
scenario publishes a bundle with one defect — no signature, a signature by an
untrusted key, a wrong signature, a blob tampered at rest, a chunk corrupted in
transit, a manifest swapped in the database — to two devices that trust one
signing key, then publishes it again as a new version. Both devices refuse both
versions with REFUSED and the reason; neither installs, runs or uploads
anything (run records, install state and the results table are all empty).
The control scenario, correctly signed, runs and uploads on both.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
from collections.abc import Iterator

import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN
from sec_helpers import query, until, write_bundle

from tether.agent import client, daemon
from tether.common import admin_client, signing
from tether.controller import blobs

FAST = client.Backoff(initial_s=0.05, max_s=0.3)
RELEASE = "default/secure-task"
MODEL = os.urandom(600_000)  # several 256 KiB chunks


class CorruptingBlobStore:
    """The controller's blob store, serving byte `CORRUPT_AT` of `target` flipped on every read (in transit)."""

    CORRUPT_AT = 300_000  # inside the second 256 KiB chunk

    def __init__(self, inner: blobs.FilesystemBlobStore) -> None:
        self.inner = inner
        self.target = ""

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def read_range(
        self, digest: str, *, offset: int = 0, chunk_size: int = blobs.DEFAULT_CHUNK_SIZE
    ) -> Iterator[bytes]:
        position = offset
        for chunk in self.inner.read_range(digest, offset=offset, chunk_size=chunk_size):
            if digest == self.target and position <= self.CORRUPT_AT < position + len(chunk):
                i = self.CORRUPT_AT - position
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
            position += len(chunk)
            yield chunk


@pytest.fixture()
def keys(tmp_path):
    trusted_priv, trusted_pub, _ = signing.generate(tmp_path / "keys" / "trusted.pem")
    other_priv, _, _ = signing.generate(tmp_path / "keys" / "other.pem")
    return {
        "trusted": signing.load_private_key(trusted_priv),
        "other": signing.load_private_key(other_priv),
        "trust": signing.load_trusted_keys([trusted_pub]),
    }


def make_agent(address: str, root: pathlib.Path, name: str, trust) -> daemon.Agent:
    return daemon.Agent(
        controller=address,
        state_dir=root / name / "state",
        data_dir=root / name / "data",
        bootstrap_token=BOOTSTRAP_TOKEN,
        device_id=name,
        attributes={"os": "android"},
        backends=["mnn/cpu"],
        trusted_keys=trust,
        backoff=FAST,
        rng=random.Random(0),
    )


SCENARIOS = {
    # name: (reason the devices report, None for the control that must run)
    "signed": None,
    "unsigned": "manifest is unsigned",
    "untrusted key": "signed by untrusted key",
    "wrong signature": "does not verify",
    "tampered blob": "sha256",
    "corrupted chunk": "sha256",
    "swapped manifest": "manifest hashes to",
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_defective_bundles_are_refused_reported_and_never_run(
    scenario, controller_config, start, keys, tmp_path, database_url
):
    store = CorruptingBlobStore(blobs.FilesystemBlobStore(controller_config.blob_dir))
    controller = await start(controller_config, blob_store=store)
    directory, bundle = write_bundle(tmp_path / "bundle", extra={"model.bin": MODEL})
    model = bundle.file("model.bin").sha256
    body = bundle.canonical_bytes()
    signature = {
        "signed": signing.sign(body, keys["trusted"]),
        "unsigned": None,
        "untrusted key": signing.sign(body, keys["other"]),
        "wrong signature": signing.Signature(
            signature=signing.sign(body + b" ", keys["trusted"]).signature,
            key_id=signing.key_id(next(iter(keys["trust"].values()))),
        ),
    }.get(scenario, signing.sign(body, keys["trusted"]))
    agents = [make_agent(controller.address, tmp_path, f"phone-{i}", keys["trust"]) for i in range(2)]
    runs = [asyncio.create_task(a.run()) for a in agents]
    try:
        async with admin_client.AdminClient(target=controller.address, token=ADMIN_TOKEN) as adm:
            extra = {} if signature is None else {"signature": signature.signature, "key_id": signature.key_id}
            await adm.upload_bundle(directory, bundle, **extra)
            if scenario == "tampered blob":  # at rest on the controller: same size, one byte changed
                path = controller.blobs.path_for(model)
                data = bytearray(path.read_bytes())
                data[len(data) // 2] ^= 0x01
                path.chmod(0o644)
                path.write_bytes(bytes(data))
            elif scenario == "corrupted chunk":  # in transit: every read of the model's second chunk
                store.target = model
            elif scenario == "swapped manifest":  # in the database: another (valid) manifest under this digest
                other_dir, other = write_bundle(tmp_path / "other", name="other-task")
                await adm.upload_bundle(other_dir, other)
                query(
                    database_url,
                    "UPDATE manifests SET body = (SELECT body FROM manifests WHERE digest = %s) WHERE digest = %s"
                    " RETURNING 1",
                    other.digest,
                    bundle.digest,
                )
            await until(lambda: _all_connected(agents))
            for version, trigger in ((1, {"type": "onInstall"}), (2, {"type": "interval", "seconds": 3600})):
                applied = await adm.apply_release(
                    release=RELEASE,
                    manifest_digest=bundle.digest,
                    target={"matchLabels": {"os": "android"}},
                    trigger=trigger,
                )
                assert applied.version == version
                final = "succeeded" if SCENARIOS[scenario] is None else "refused"

                async def settled(version=version, final=final) -> bool:
                    rows = query(database_url, "SELECT version, state FROM deliveries WHERE release = %s", RELEASE)
                    return sorted(rows) == [(version, final)] * 2

                await until(settled, timeout=60)
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*runs)

    reason = SCENARIOS[scenario]
    deliveries = query(database_url, "SELECT device_id, version, state, message FROM deliveries ORDER BY device_id")
    results = query(database_url, "SELECT device_id, version FROM results ORDER BY device_id, version")
    if reason is None:  # the control: both devices ran both versions and uploaded
        assert [(d, v, s) for d, v, s, _ in deliveries] == [("phone-0", 2, "succeeded"), ("phone-1", 2, "succeeded")]
        assert results == [("phone-0", 1), ("phone-0", 2), ("phone-1", 1), ("phone-1", 2)]
        for a in agents:
            assert a.store.current(RELEASE) == 2 and len(a.state.runs_of(RELEASE)) == 2
        return
    for device_id, version, state, message in deliveries:
        assert (version, state) == (2, "refused"), device_id
        assert reason in message, (device_id, message)
    assert results == []
    for a in agents:
        assert a.state.runs_of(RELEASE) == []  # nothing ran, not even once
        assert RELEASE not in a.state.installed
        assert a.store.current(RELEASE) is None
        assert a.state.refused[RELEASE]["version"] == 2 and reason in a.state.refused[RELEASE]["reason"]
        assert not list((a.state_dir).rglob("*.partial"))  # a refused download leaves no partial blob behind


async def _all_connected(agents) -> bool:
    return all(a.connected.is_set() for a in agents)


async def test_the_controller_can_refuse_unsigned_and_wrongly_signed_bundles_at_upload(
    controller_config, start, keys, tmp_path, database_url
):
    trusted_pub = tmp_path / "keys" / "trusted.pub"
    controller = await start(controller_config, require_signed_bundles=True, trusted_key_files=(trusted_pub,))
    directory, bundle = write_bundle(tmp_path / "bundle")
    body = bundle.canonical_bytes()
    from tether.common import errors

    async with admin_client.AdminClient(target=controller.address, token=ADMIN_TOKEN) as adm:
        with pytest.raises(errors.FailedPrecondition, match="only signed bundles"):
            await adm.upload_bundle(directory, bundle)
        bad = signing.sign(body, keys["other"])
        with pytest.raises(errors.VerificationFailed, match="untrusted key"):  # FAILED_PRECONDITION on the wire
            await adm.upload_bundle(directory, bundle, signature=bad.signature, key_id=bad.key_id)
        assert query(database_url, "SELECT count(*) FROM manifests") == [(0,)]
        good = signing.sign(body, keys["trusted"])
        upload = await adm.upload_bundle(directory, bundle, signature=good.signature, key_id=good.key_id)
        assert query(database_url, "SELECT digest, key_id FROM manifests") == [(upload.digest, good.key_id)]
