"""Ed25519 bundle signing, pure and through the CLI: keys, key ids, sign/verify, the controller's policy."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tether.common import errors, signing

BODY = b'{"files":[],"name":"t"}'


@pytest.fixture()
def keypair(tmp_path):
    private, public, key_id = signing.generate(tmp_path / "k.pem")
    return private, public, key_id


def test_generate_writes_a_private_key_only_its_owner_reads_and_names_it_by_key_id(keypair, tmp_path):
    private, public, key_id = keypair
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public == tmp_path / "k.pub"
    raw = signing.load_public_key(public)
    assert len(raw) == 32
    assert key_id == hashlib.sha256(raw).hexdigest()[:16]
    assert signing.load_public_key(private) == raw  # a private key file yields its public half
    with pytest.raises(errors.FailedPrecondition, match="already exists"):
        signing.generate(tmp_path / "k.pem")


def test_sign_and_verify_and_every_way_to_fail(keypair, tmp_path):
    private, public, key_id = keypair
    trusted = signing.load_trusted_keys([public])
    sig = signing.sign(BODY, signing.load_private_key(private))
    assert sig.key_id == key_id and len(sig.signature) == 64
    assert signing.verify(BODY, signature=sig.signature, key_id_=key_id, trusted=trusted) == key_id

    _, _, other_id = signing.generate(tmp_path / "other.pem")
    other_sig = signing.sign(BODY, signing.load_private_key(tmp_path / "other.pem"))
    cases = {
        "unsigned": (BODY, b"", key_id, "unsigned"),
        "tampered body": (BODY + b" ", sig.signature, key_id, "does not verify"),
        "flipped bit": (BODY, bytes([sig.signature[0] ^ 1]) + sig.signature[1:], key_id, "does not verify"),
        "truncated": (BODY, sig.signature[:63], key_id, "wrong length"),
        "untrusted key": (BODY, other_sig.signature, other_id, "untrusted key"),
        "trusted id, other key's signature": (BODY, other_sig.signature, key_id, "does not verify"),
    }
    for name, (body, signature, kid, message) in cases.items():
        with pytest.raises(errors.VerificationFailed, match=message):
            signing.verify(body, signature=signature, key_id_=kid, trusted=trusted)
        assert name


def test_loading_keys_refuses_what_is_not_an_ed25519_pem(tmp_path):
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    with pytest.raises(errors.InvalidArgument, match="not a PEM Ed25519 key"):
        signing.load_public_key(tmp_path / "junk.pem")
    with pytest.raises(errors.InvalidArgument, match="not an unencrypted PEM private key"):
        signing.load_private_key(tmp_path / "junk.pem")
    with pytest.raises(errors.InvalidArgument, match="public key"):
        signing.load_trusted_keys([tmp_path / "missing.pub"])
    from tether.common import certs

    certs.init_ca_dir(tmp_path / "ca")  # an EC key is not an Ed25519 key
    with pytest.raises(errors.InvalidArgument, match="not an Ed25519 key"):
        signing.load_private_key(tmp_path / "ca" / "ca.key")


def test_key_id_is_sha256_of_the_raw_public_key():
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert signing.key_id(key.public_key()) == signing.key_id(raw) == hashlib.sha256(raw).hexdigest()[:16]


def test_trusted_keys_from_the_environment_are_path_separated(tmp_path):
    env = {signing.ENV_TRUSTED_KEYS: f"{tmp_path / 'a.pub'}{os.pathsep}{tmp_path / 'b.pub'}{os.pathsep}"}
    assert signing.trusted_key_paths_from_env(env) == [str(tmp_path / "a.pub"), str(tmp_path / "b.pub")]


def test_controller_bundle_policy(keypair):
    private, public, key_id = keypair
    sig = signing.sign(BODY, signing.load_private_key(private))
    trusted = signing.load_trusted_keys([public])
    signing.BundlePolicy().check(BODY, signature=b"", key_id_="")  # default: anything goes
    signing.BundlePolicy().check(BODY, signature=b"x" * 64, key_id_="whatever")  # nothing to verify against
    with pytest.raises(errors.FailedPrecondition, match="only signed bundles"):
        signing.BundlePolicy(require_signature=True).check(BODY, signature=b"", key_id_="")
    strict = signing.BundlePolicy(require_signature=True, trusted=trusted)
    strict.check(BODY, signature=sig.signature, key_id_=key_id)
    with pytest.raises(errors.VerificationFailed, match="does not verify"):
        strict.check(BODY + b"x", signature=sig.signature, key_id_=key_id)


def _tether(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tether.cli.main", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_cli_keys_generate_and_bundle_build_sign_locally(tmp_path):
    made = _tether("keys", "generate", str(tmp_path / "keys" / "release.pem"))
    assert made.returncode == 0, made.stderr
    key_id = made.stdout.strip()
    assert _tether("keys", "id", str(tmp_path / "keys" / "release.pub")).stdout.strip() == key_id
    again = _tether("keys", "generate", str(tmp_path / "keys" / "release.pem"))
    assert again.returncode != 0 and "already exists" in again.stderr

    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("def run(ctx):\n    return {'sample_count': 1}\n")
    (task / "bundle.yaml").write_text("name: signed-task\nentrypoint: task.py\n")
    out = tmp_path / "out"
    built = _tether("bundle", "build", str(task), "--out", str(out), "--sign", str(tmp_path / "keys" / "release.pem"))
    assert built.returncode == 0, built.stderr
    digest = built.stdout.strip().splitlines()[-1]
    manifest_path = out / "manifests" / (digest.split(":", 1)[1] + ".json")
    doc = json.loads(manifest_path.with_suffix(".sig").read_text())
    assert doc["key_id"] == key_id
    import base64

    signing.verify(
        manifest_path.read_bytes(),
        signature=base64.b64decode(doc["signature"]),
        key_id_=key_id,
        trusted=signing.load_trusted_keys([tmp_path / "keys" / "release.pub"]),
    )
    bad = _tether("bundle", "build", str(task), "--out", str(out), "--sign", str(tmp_path / "keys" / "release.pub"))
    assert bad.returncode != 0 and "signing key" in bad.stderr
