"""Signed device credentials, pure: format, signature, expiry, key rotation, key files, renewal timing."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.agent import session
from tether.common import auth, credentials, errors

KEY = b"k" * 32
OTHER = b"o" * 32


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cred(device_id: str = "phone-1") -> auth.Credential:
    return auth.Credential(device_id=device_id, secret=auth.new_secret())


@pytest.mark.parametrize("device_id", ["phone-1", "a.b.c", "fleet:eu-west:0001", "X" * 128])
def test_issue_then_verify_round_trips_any_device_id(device_id):
    clock = Clock()
    signer = credentials.Signer([KEY], ttl_s=3600, clock=clock)
    c = cred(device_id)
    token = str(signer.issue(c))
    assert token.startswith(f"v1.{device_id}.{int(clock.now) + 3600}.")
    parsed = signer.verify(token)
    assert parsed.credential == c
    assert parsed.expires_at == int(clock.now) + 3600
    assert credentials.expires_at(token) == parsed.expires_at
    assert c.secret not in repr(parsed)


def test_every_altered_part_breaks_the_signature():
    signer = credentials.Signer([KEY], clock=Clock())
    good = signer.issue(cred("phone-1"))
    other = signer.issue(cred("phone-2"))
    sig = good.signature
    flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    forgeries = {
        "signature": f"{good.signed_part}.{flipped}",
        "device id": str(good).replace("v1.phone-1.", "v1.phone-2.", 1),
        "expiry": f"v1.phone-1.{good.expires_at + 86400}.{good.secret}.{sig}",
        "secret": f"v1.phone-1.{good.expires_at}.{other.secret}.{sig}",
        "another device's signature": f"{good.signed_part}.{other.signature}",
    }
    for what, token in forgeries.items():
        with pytest.raises(errors.Unauthenticated, match="signature is invalid"):
            signer.verify(token)
        assert what  # (the loop names the case in a failure's locals)


def test_a_token_signed_with_another_key_is_refused():
    clock = Clock()
    token = str(credentials.Signer([OTHER], clock=clock).issue(cred()))
    with pytest.raises(errors.Unauthenticated, match="signature is invalid"):
        credentials.Signer([KEY], clock=clock).verify(token)


def test_expiry_is_enforced_to_the_second():
    clock = Clock()
    signer = credentials.Signer([KEY], ttl_s=60, clock=clock)
    token = str(signer.issue(cred()))
    clock.now += 59
    signer.verify(token)
    clock.now += 1
    with pytest.raises(errors.Unauthenticated, match="expired 0s ago; renew it or enrol again"):
        signer.verify(token)
    clock.now += 3600
    with pytest.raises(errors.Unauthenticated, match="expired 3600s ago"):
        signer.verify(token)


def test_key_rotation_new_key_signs_old_keys_still_verify_until_dropped():
    clock = Clock()
    old_token = str(credentials.Signer([OTHER], clock=clock).issue(cred()))
    rotated = credentials.Signer([KEY, OTHER], clock=clock)
    rotated.verify(old_token)
    new_token = str(rotated.issue(cred()))
    credentials.Signer([KEY], clock=clock).verify(new_token)
    with pytest.raises(errors.Unauthenticated):
        credentials.Signer([KEY], clock=clock).verify(old_token)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "phone-1." + "s" * 43,  # the unsigned legacy form
        "v2.phone-1.1900000000." + "s" * 43 + "." + "x" * 43,
        "v1.phone-1.1900000000." + "s" * 43,
        "v1..1900000000." + "s" * 43 + "." + "x" * 43,
        "v1.phone-1.soon." + "s" * 43 + "." + "x" * 43,
        "v1.phone-1.1900000000.short." + "x" * 43,
        "v1.phone-1.1900000000." + "s" * 43 + ".short",
        "v1.phone 1.1900000000." + "s" * 43 + "." + "x" * 43,
        "v1." + "a" * 600,
    ],
)
def test_malformed_tokens_are_unauthenticated(token):
    with pytest.raises(errors.Unauthenticated, match="malformed"):
        credentials.Signer([KEY]).verify(token)
    assert credentials.expires_at(token) is None


_B64 = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", min_size=43, max_size=43)
_WELL_FORMED = st.builds(
    lambda d, e, s, g: f"v1.{d}.{e}.{s}.{g}",
    st.from_regex(r"[a-z0-9][a-z0-9.:-]{0,20}", fullmatch=True),
    st.integers(0, 10**12 - 1),
    _B64,
    _B64,
)
_SIGNER = credentials.Signer([KEY], clock=Clock())


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300) | _WELL_FORMED)
def test_fuzzed_tokens_never_verify_and_only_raise_unauthenticated(token):
    with pytest.raises(errors.Unauthenticated):
        _SIGNER.verify(token)


def test_signer_refuses_weak_configuration():
    with pytest.raises(errors.InvalidArgument, match="at least one"):
        credentials.Signer([])
    with pytest.raises(errors.InvalidArgument, match="at least 32 bytes"):
        credentials.Signer([b"short"])
    with pytest.raises(errors.InvalidArgument, match="TTL"):
        credentials.Signer([KEY], ttl_s=5)


def test_key_files_hex_or_text_first_signs_comments_ignored(tmp_path):
    hex_key = os.urandom(32).hex()
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-11\n\n{hex_key}\n{'t' * 40}\n")
    keys = credentials.load_key_file(path)
    assert keys == [bytes.fromhex(hex_key), b"t" * 40]
    (tmp_path / "weak").write_text("too-short\n")
    with pytest.raises(errors.InvalidArgument, match="at least 32 bytes"):
        credentials.load_key_file(tmp_path / "weak")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(errors.InvalidArgument, match="no key"):
        credentials.load_key_file(tmp_path / "empty")
    with pytest.raises(errors.InvalidArgument, match="credential key file"):
        credentials.load_key_file(tmp_path / "missing")


@pytest.mark.parametrize(("remaining", "jitter", "expected"), [(3600, 0.0, 2400), (3600, 1.0, 2160), (0.5, 0.0, 1.0)])
def test_agents_renew_after_two_thirds_of_the_remaining_lifetime(remaining, jitter, expected):
    assert session.renewal_delay(remaining_s=remaining, jitter=jitter) == pytest.approx(expected)
