"""TLS and mutual TLS on the gRPC port, end to end over real sockets, with certificates from `tether certs`."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN
from sec_helpers import first_event

from tether.agent import client as client_mod
from tether.common import admin_client, certs, errors, tls
from tether.proto.v1 import tether_pb2 as pb


def server_tls(ca_dir, *, mtls: bool = False) -> dict:
    return {
        "tls_cert_file": ca_dir / "server.crt",
        "tls_key_file": ca_dir / "server.key",
        "tls_client_ca_file": ca_dir / "ca.crt" if mtls else None,
    }


async def admin_works(address: str, client_tls: tls.ClientTLS) -> bool:
    async with admin_client.AdminClient(target=address, token=ADMIN_TOKEN, tls=client_tls, timeout_s=3) as client:
        try:
            await client.list_releases()
        except admin_client.Unavailable:
            return False
    return True


async def device_enrols(address: str, client_tls: tls.ClientTLS) -> pb.EnrollResponse:
    async with client_mod.DeviceClient(address, channel_credentials=client_tls.channel_credentials()) as c:
        return await c.enroll(bootstrap_token=BOOTSTRAP_TOKEN, device=pb.DeviceInfo(device_id="phone-tls"))


async def test_tls_serves_clients_that_trust_the_ca_only(controller_config, start, ca_dir, other_ca_dir):
    running = await start(controller_config, **server_tls(ca_dir))
    trusted = tls.ClientTLS(ca_file=ca_dir / "ca.crt")
    assert await admin_works(running.address, trusted)
    # A device over TLS: enrol, then hold its stream with the signed credential.
    response = await device_enrols(running.address, trusted)
    async with client_mod.DeviceClient(
        running.address, credential=response.credential, channel_credentials=trusted.channel_credentials()
    ) as c:
        stream = c.subscribe([])
        assert (await first_event(stream)).HasField("sync")
        stream.cancel()
    # The certificate is checked against the name dialled: "localhost" is in it, an override must be too.
    localhost = f"localhost:{running.port}"
    assert await admin_works(localhost, trusted)
    assert not await admin_works(running.address, tls.ClientTLS(ca_file=ca_dir / "ca.crt", server_name="evil.example"))
    # A client trusting another CA, and a plaintext client, get nowhere.
    assert not await admin_works(running.address, tls.ClientTLS(ca_file=other_ca_dir / "ca.crt"))
    async with grpc.aio.insecure_channel(running.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/tether.v1.AdminService/ListReleases")(b"", timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_requires_a_client_certificate_signed_by_the_client_ca(
    controller_config, start, ca_dir, other_ca_dir
):
    running = await start(controller_config, **server_tls(ca_dir, mtls=True))
    with_cert = tls.ClientTLS(
        ca_file=ca_dir / "ca.crt", cert_file=ca_dir / "device-1.crt", key_file=ca_dir / "device-1.key"
    )
    assert await admin_works(running.address, with_cert)
    assert (await device_enrols(running.address, with_cert)).credential.startswith("v1.phone-tls.")
    # No certificate, or one from another CA: the handshake fails, no RPC is served.
    assert not await admin_works(running.address, tls.ClientTLS(ca_file=ca_dir / "ca.crt"))
    intruder = tls.ClientTLS(
        ca_file=ca_dir / "ca.crt", cert_file=other_ca_dir / "intruder.crt", key_file=other_ca_dir / "intruder.key"
    )
    assert not await admin_works(running.address, intruder)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await device_enrols(running.address, tls.ClientTLS(ca_file=ca_dir / "ca.crt"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certs_init_and_client_files_and_their_refusals(tmp_path):
    files = certs.init_ca_dir(tmp_path / "ca", hosts=("tether.example.com", "10.0.0.7"))
    for path in (files.ca_key, files.server_key):
        assert path.stat().st_mode & 0o077 == 0
    from cryptography import x509

    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["tether.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    with pytest.raises(errors.FailedPrecondition, match="already exists"):
        certs.init_ca_dir(tmp_path / "ca")
    with pytest.raises(errors.InvalidArgument):
        certs.issue_client(tmp_path / "ca", "../escape")
    with pytest.raises(errors.InvalidArgument):
        certs.issue_client(tmp_path / "ca", "server")
    with pytest.raises(errors.FailedPrecondition, match="tether certs init"):
        certs.issue_client(tmp_path / "nothing", "device")


def test_client_tls_configuration_errors_name_the_problem(tmp_path, ca_dir):
    with pytest.raises(tls.TLSConfigError, match="both --client-cert and --client-key"):
        tls.ClientTLS(ca_file=ca_dir / "ca.crt", cert_file=ca_dir / "device-1.crt")
    with pytest.raises(tls.TLSConfigError, match="needs --ca-file"):
        tls.ClientTLS(cert_file=ca_dir / "device-1.crt", key_file=ca_dir / "device-1.key")
    with pytest.raises(tls.TLSConfigError, match=r"CA file .*missing"):
        tls.ClientTLS(ca_file=tmp_path / "missing.crt").channel_credentials()
    (tmp_path / "junk").write_text("junk")
    with pytest.raises(tls.TLSConfigError, match="not a PEM file"):
        tls.ClientTLS(ca_file=tmp_path / "junk").channel_credentials()
    assert tls.ClientTLS().channel_credentials() is None
    env = {tls.ENV_CA_FILE: str(ca_dir / "ca.crt"), tls.ENV_SERVER_NAME: "localhost"}
    from_env = tls.ClientTLS.from_env(env)
    assert from_env.enabled and from_env.channel_options() == [("grpc.ssl_target_name_override", "localhost")]


def _tether(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "tether.cli.main", *args], capture_output=True, text=True, timeout=60, env=env
    )


async def test_cli_revokes_a_device_over_mtls_and_refuses_without_a_client_certificate(
    controller_config, start, ca_dir
):
    running = await start(controller_config, **server_tls(ca_dir, mtls=True))
    with_cert = tls.ClientTLS(
        ca_file=ca_dir / "ca.crt", cert_file=ca_dir / "device-1.crt", key_file=ca_dir / "device-1.key"
    )
    await device_enrols(running.address, with_cert)
    base = ["device", "revoke", "phone-tls", "--controller", running.address, "--admin-token", ADMIN_TOKEN]
    cert_args = ["--ca-file", str(ca_dir / "ca.crt")]
    import asyncio

    refused = await asyncio.to_thread(_tether, *base, *cert_args)
    assert refused.returncode != 0 and "UNAVAILABLE" in refused.stderr
    client_args = ["--client-cert", str(ca_dir / "device-1.crt"), "--client-key", str(ca_dir / "device-1.key")]
    done = await asyncio.to_thread(_tether, *base, *cert_args, *client_args)
    assert done.returncode == 0, done.stderr
    assert "device phone-tls revoked" in done.stdout
    again = await asyncio.to_thread(_tether, *base, *cert_args, *client_args)
    assert "already revoked" in again.stdout
    half = await asyncio.to_thread(_tether, *base, "--client-cert", str(ca_dir / "device-1.crt"))
    assert half.returncode == 2 and "--client-key" in half.stderr
