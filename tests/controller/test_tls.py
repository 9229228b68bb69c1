"""The controller serves TLS when given a certificate and key (the Helm chart's --tls-cert / --tls-key)."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress

import grpc
import pytest
from controller_support import ADMIN_TOKEN, running_controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether.common import admin_client


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "tls.crt", tmp_path / "tls.key", cert_pem


async def test_tls_controller_and_admin_client(controller_config, enqueuer, tmp_path):
    cert, key, cert_pem = self_signed(tmp_path)
    cfg = dataclasses.replace(controller_config, tls_cert_file=cert, tls_key_file=key)
    async with running_controller(cfg, enqueuer=enqueuer, grace=0.2) as running:
        async with admin_client.AdminClient(
            target=running.address, token=ADMIN_TOKEN, root_certificates=cert_pem
        ) as client:
            assert await client.list_releases() == []
        # A plaintext client cannot talk to it.
        async with grpc.aio.insecure_channel(running.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await ch.unary_unary("/tether.v1.AdminService/ListReleases")(b"", timeout=3)
