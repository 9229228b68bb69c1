import pathlib

import pytest

from tether.common import auth, config, errors

ENV = {
    "TETHER_DATABASE_URL": "postgresql://db/tether",
    "TETHER_ADMIN_TOKEN": "admin-secret",
    "TETHER_BOOTSTRAP_TOKEN": "boot-secret",
    "TETHER_BROKER_URL": "redis://broker/0",
    "TETHER_BLOB_DIR": "/var/lib/blobs",
}


def test_config_from_env_and_overrides():
    cfg = config.ControllerConfig.from_env(ENV)
    assert cfg.database_url == "postgresql://db/tether"
    assert cfg.broker_url == "redis://broker/0"
    assert cfg.blob_dir == pathlib.Path("/var/lib/blobs")
    assert cfg.listen == "0.0.0.0:7443"
    cfg = config.ControllerConfig.from_env(ENV, listen="127.0.0.1:0", admin_token=None, blob_dir="/tmp/b")
    assert (cfg.host, cfg.port) == ("127.0.0.1", 0)
    assert cfg.admin_token == "admin-secret"  # None means "not given"
    assert cfg.blob_dir == pathlib.Path("/tmp/b")
    assert "admin-secret" not in repr(cfg)


@pytest.mark.parametrize(
    ("missing", "fragment"),
    [
        ("TETHER_DATABASE_URL", "TETHER_DATABASE_URL"),
        ("TETHER_ADMIN_TOKEN", "TETHER_ADMIN_TOKEN"),
        ("TETHER_BOOTSTRAP_TOKEN", "TETHER_BOOTSTRAP_TOKEN"),
    ],
)
def test_missing_settings_name_the_variable(missing, fragment):
    env = {k: v for k, v in ENV.items() if k != missing}
    with pytest.raises(config.ConfigError, match=fragment):
        config.ControllerConfig.from_env(env)


@pytest.mark.parametrize("listen", ["7443", "host:", "host:99999", ":80"])
def test_bad_listen(listen):
    with pytest.raises(config.ConfigError, match="listen"):
        config.ControllerConfig.from_env(ENV, listen=listen)


def test_host_port_helpers():
    assert config.split_host_port("[::]:7443") == ("::", 7443)
    assert config.join_host_port("::1", 5) == "[::1]:5"
    assert config.controller_target({}) == "127.0.0.1:7443"
    assert config.controller_target({"TETHER_CONTROLLER": "c:1"}) == "c:1"


def test_bearer_metadata_round_trip():
    md = auth.bearer_metadata("tok")
    assert auth.bearer_token(md) == "tok"
    assert auth.bearer_token([("Authorization", b"Bearer tok2")]) == "tok2"


@pytest.mark.parametrize("metadata", [None, [], [("authorization", "Basic x")], [("authorization", "Bearer ")]])
def test_bad_bearer_metadata(metadata):
    with pytest.raises(errors.Unauthenticated):
        auth.bearer_token(metadata)


def test_credentials():
    cred = auth.Credential(device_id="dev.1", secret=auth.new_secret())
    parsed = auth.parse_credential(str(cred))
    assert parsed == cred
    assert auth.secret_matches(parsed.secret, cred.secret_hash)
    assert not auth.secret_matches(auth.new_secret(), cred.secret_hash)
    assert cred.secret not in repr(cred)


@pytest.mark.parametrize("token", ["nodot", "dev.", ".secretsecretsecret", "dev.short", "d v.secretsecretsecret1"])
def test_malformed_credentials(token):
    with pytest.raises(errors.Unauthenticated):
        auth.parse_credential(token)


@pytest.mark.parametrize("device_id", ["", "-x", "a" * 129, "a b", "a/b"])
def test_bad_device_ids(device_id):
    with pytest.raises(errors.InvalidArgument):
        auth.check_device_id(device_id)
