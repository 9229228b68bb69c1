"""Ed25519 bundle signing: who may publish code that devices run.

`tether keys generate KEY.pem` makes a key pair (`KEY.pem`, 0600, and the
public `KEY.pub`); `tether bundle build --sign KEY.pem` signs the manifest's
canonical bytes, which name every file by its sha256, so one signature covers
the whole bundle. A key is named by its key id, the first 16 hex digits of
sha256 of the raw 32-byte public key, which travels with the signature so a
verifier with several trusted keys knows which one to use.

Agents configured with trusted public keys (`--trust-key FILE`,
TETHER_TRUSTED_KEYS) run only bundles signed by one of them; the controller
can refuse unsigned or wrongly signed manifests at upload
(`--require-signed-bundles`, `--trust-key`). Verification failures are
`VerificationFailed` on the device (the bundle is refused, reported, never
run) and `InvalidArgument` / `FailedPrecondition` at the controller.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tether.common import errors

ENV_TRUSTED_KEYS = "TETHER_TRUSTED_KEYS"  # os.pathsep-separated public key files
KEY_ID_HEX = 16
SIGNATURE_BYTES = 64
MAX_KEY_FILE_BYTES = 64 * 1024


def key_id(public: Ed25519PublicKey | bytes) -> str:
    raw = public if isinstance(public, bytes) else _raw(public)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX]


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclasses.dataclass(frozen=True)
class Signature:
    signature: bytes
    key_id: str


def generate(path: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[pathlib.Path, pathlib.Path, str]:
    """Write a new private key to `path` (0600) and its public key next to it (`.pub`); return (priv, pub, key_id)."""
    priv_path = pathlib.Path(path)
    pub_path = priv_path.with_suffix(".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise errors.FailedPrecondition(f"{p} already exists (use --force to replace it)")
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = priv_path.with_name(f".{priv_path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, priv_path)
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_path.write_bytes(pub_pem)
    return priv_path, pub_path, key_id(key.public_key())


def _read(path: pathlib.Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise errors.InvalidArgument(f"{what} {path}: {e.strerror or e}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise errors.InvalidArgument(f"{what} {path}: too large to be a key")
    return data


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    p = pathlib.Path(path)
    try:
        key = serialization.load_pem_private_key(_read(p, "signing key"), password=None)
    except (ValueError, TypeError) as e:
        raise errors.InvalidArgument(f"signing key {p}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise errors.InvalidArgument(f"signing key {p}: not an Ed25519 key (make one with `tether keys generate`)")
    return key


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The raw 32-byte public key of a PEM public key file (or of a PEM private key: its public half)."""
    p = pathlib.Path(path)
    data = _read(p, "public key")
    try:
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            if not isinstance(private, Ed25519PrivateKey):
                raise ValueError("not Ed25519")
            return _raw(private.public_key())
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise errors.InvalidArgument(f"public key {p}: not a PEM Ed25519 key ({e})") from None
    if not isinstance(public, Ed25519PublicKey):
        raise errors.InvalidArgument(f"public key {p}: not an Ed25519 key")
    return _raw(public)


def load_trusted_keys(paths: Iterable[str | os.PathLike[str]]) -> dict[str, bytes]:
    """{key_id: raw public key} for the files given (what `Agent(trusted_keys=...)` takes)."""
    keys: dict[str, bytes] = {}
    for path in paths:
        raw = load_public_key(path)
        keys[key_id(raw)] = raw
    return keys


def trusted_key_paths_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    return [p for p in (env.get(ENV_TRUSTED_KEYS) or "").split(os.pathsep) if p.strip()]


def sign(body: bytes, key: Ed25519PrivateKey) -> Signature:
    """Sign manifest bytes (the canonical bytes: the digest's preimage)."""
    return Signature(signature=key.sign(body), key_id=key_id(key.public_key()))


def verify(body: bytes, *, signature: bytes, key_id_: str, trusted: Mapping[str, bytes]) -> str:
    """Check that a trusted key signed `body`; return the key id. VerificationFailed with the reason otherwise."""
    if not signature:
        raise errors.VerificationFailed("manifest is unsigned and only signed bundles are accepted")
    raw = trusted.get(key_id_)
    if raw is None:
        raise errors.VerificationFailed(f"manifest is signed by untrusted key {key_id_[:64]!r}")
    if len(signature) != SIGNATURE_BYTES:
        raise errors.VerificationFailed(f"manifest signature by {key_id_!r} does not verify (wrong length)")
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, body)
    except (InvalidSignature, ValueError):
        raise errors.VerificationFailed(f"manifest signature by {key_id_!r} does not verify") from None
    return key_id_


@dataclasses.dataclass(frozen=True)
class BundlePolicy:
    """What a controller accepts at PutManifest.

    With trusted keys, a signature must verify against one of them; with
    `require_signature`, an unsigned manifest is refused. The default accepts
    anything (agents still enforce their own trusted keys).
    """

    require_signature: bool = False
    trusted: Mapping[str, bytes] = dataclasses.field(default_factory=dict)

    def check(self, body: bytes, *, signature: bytes, key_id_: str) -> None:
        if not signature:
            if self.require_signature:
                raise errors.FailedPrecondition(
                    "this controller accepts only signed bundles: build with `tether bundle build --sign KEY.pem`"
                )
            return
        if self.trusted:
            verify(body, signature=signature, key_id_=key_id_, trusted=self.trusted)
