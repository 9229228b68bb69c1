"""A small private CA for the gRPC port: `tether certs init` and `tether demo` use it.

`init_ca_dir(dir, hosts=...)` writes, in `dir`:

| file | what | who needs it |
|---|---|---|
| `ca.crt` | the CA certificate | every client (`--ca-file`), the controller for mTLS (`--tls-client-ca`) |
| `ca.key` | the CA private key (0600) | only `tether certs client` later; keep it offline |
| `server.crt`, `server.key` | the controller's certificate for `hosts` | the controller (`--tls-cert`, `--tls-key`) |

and `issue_client(dir, name)` adds `<name>.crt` / `<name>.key`, a client
certificate for mTLS. Keys are ECDSA P-256 (fast to make: the demo creates a
CA per run). Certificates are X.509 v3 with the usual constraints (the CA may
only sign, the server certificate is for serverAuth with the hosts as SANs,
client certificates for clientAuth), which is what gRPC's BoringSSL checks.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tether.common import errors

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
LEAF_DAYS = 825


@dataclasses.dataclass(frozen=True)
class CAFiles:
    ca_cert: pathlib.Path
    ca_key: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: pathlib.Path, data: bytes, *, private: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            if not host or len(host) > 253 or any(c.isspace() for c in host):
                raise errors.InvalidArgument(f"host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(
    *, common_name: str = "Tether CA", days: int = CA_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    hosts: Sequence[str] = (),
    server: bool,
    days: int = LEAF_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by the CA: for a server (with `hosts` as SANs) or a client."""
    if server and not hosts:
        raise errors.InvalidArgument("a server certificate needs at least one host name or address")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def init_ca_dir(
    directory: str | os.PathLike[str], *, hosts: Sequence[str] = DEFAULT_HOSTS, overwrite: bool = False
) -> CAFiles:
    """A fresh CA and a server certificate for `hosts` in `directory`; refuses to overwrite unless told."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = CAFiles(d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key")
    existing = [p for p in dataclasses.astuple(files) if p.exists()]
    if existing and not overwrite:
        raise errors.FailedPrecondition(f"{existing[0]} already exists (use --force to replace the CA)")
    ca_cert, ca_key = make_ca()
    cert, key = issue(ca_cert=ca_cert, ca_key=ca_key, common_name=hosts[0], hosts=hosts, server=True)
    _write(files.ca_key, _key_pem(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(files.server_key, _key_pem(key), private=True)
    _write(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def load_ca(directory: str | os.PathLike[str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    d = pathlib.Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise errors.FailedPrecondition(
            f"{d}: no usable ca.crt / ca.key ({e}); run `tether certs init` first"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise errors.FailedPrecondition(f"{d / 'ca.key'}: not an EC private key")
    return cert, key


def issue_client(directory: str | os.PathLike[str], name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """`<name>.crt` / `<name>.key` in `directory`: a client certificate for mTLS, signed by its CA."""
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name.startswith("."):
        raise errors.InvalidArgument(f"client name {name!r}: use letters, digits, '.', '-' and '_'")
    if name in ("ca", "server"):
        raise errors.InvalidArgument(f"client name {name!r} would overwrite the CA's own files")
    d = pathlib.Path(directory)
    ca_cert, ca_key = load_ca(d)
    cert, key = issue(ca_cert=ca_cert, ca_key=ca_key, common_name=name, server=False)
    cert_path, key_path = d / f"{name}.crt", d / f"{name}.key"
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
