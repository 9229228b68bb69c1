"""Content granularity on a device: only changed files move, shared resources are fetched once, a new version
supersedes the old on the same device while the old stays kept, a rollback switches back without downloading,
and exclusive content leaves with its task. Plus the agent's acceptance of a rollback announcement."""

from __future__ import annotations

import pathlib

from tether.agent import bundles, daemon, devicestate, participation
from tether.common import manifest
from tether.proto.v1 import tether_pb2 as pb


def bundle(root: pathlib.Path, files: dict[str, bytes], name: str = "t") -> tuple[pathlib.Path, manifest.Manifest]:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root, manifest.hash_directory(root, name=name, entrypoint="task.py")


def fetch(s: bundles.BundleStore, root: pathlib.Path, m: manifest.Manifest) -> list[str]:
    """What a device would pull for `m`: only the blobs it lacks (returned by path)."""
    pulled = []
    for f in s.missing_blobs(m):
        s.put_blob(f.sha256, (root / f.path).read_bytes())
        pulled.append(f.path)
    return pulled


def test_changed_files_shared_resources_supersede_rollback_and_exclusive_cleanup(tmp_path: pathlib.Path) -> None:
    s = bundles.BundleStore(tmp_path / "device")
    shared = b"vocabulary shared by both tasks" * 100
    r1, a1 = bundle(tmp_path / "a1", {"task.py": b"v1", "model.bin": b"M" * 5000, "vocab.txt": shared})
    assert sorted(fetch(s, r1, a1)) == ["model.bin", "task.py", "vocab.txt"]
    s.install("ml/a", 1, a1)

    # Another task using the same resource: downloaded once per device.
    rb, b1 = bundle(tmp_path / "b1", {"task.py": b"other", "vocab.txt": shared}, name="b")
    assert fetch(s, rb, b1) == ["task.py"]
    s.install("ml/b", 1, b1)

    # Version 2 of task a changes one file: only that file moves; version 1 stays kept.
    r2, a2 = bundle(tmp_path / "a2", {"task.py": b"v2", "model.bin": b"M" * 5000, "vocab.txt": shared})
    assert fetch(s, r2, a2) == ["task.py"]
    s.install("ml/a", 2, a2)
    assert s.current("ml/a") == 2 and s.versions("ml/a") == [1, 2]

    # Rollback: version 1 is still kept, so switching back needs nothing from the network.
    kept = s.installed_manifest("ml/a", 1)
    assert kept.digest == a1.digest and s.missing_blobs(kept) == []
    s.install("ml/a", 1, kept)
    assert s.current("ml/a") == 1

    # Exclusive content leaves with its task; shared content stays for the other one.
    s.uninstall("ml/a")
    removed = set(s.gc())
    assert manifest.sha256_digest(b"M" * 5000) in removed
    assert manifest.sha256_digest(shared) not in removed and s.has_blob(manifest.sha256_digest(shared))


def test_the_agent_accepts_an_older_version_only_when_it_is_a_rollback(tmp_path: pathlib.Path) -> None:
    agent = daemon.Agent(controller="127.0.0.1:1", state_dir=tmp_path / "s", data_dir=tmp_path / "d")
    kicked: list[str] = []
    agent._kick = kicked.append  # type: ignore[method-assign]
    digest = "sha256:" + "a" * 64
    agent._set_desired(pb.DesiredTask(release="ml/a", version=3, manifest_digest=digest))
    agent._set_desired(pb.DesiredTask(release="ml/a", version=2, manifest_digest=digest))  # late: ignored
    assert agent._desired["ml/a"].version == 3
    agent._set_desired(pb.DesiredTask(release="ml/a", version=2, manifest_digest=digest, rollback=True))
    assert agent._desired["ml/a"].version == 2 and kicked == ["ml/a", "ml/a"]


def test_participation_conditions_on_the_agent() -> None:
    conditions = participation.conditions_of('{"type": "onInstall", "conditions": {"charging": true, "idle": false}}')
    assert conditions == {"charging": True}
    assert participation.met(conditions, {"charging": "true", "idle": "false"})
    assert not participation.met(conditions, {"charging": "false"})
    assert participation.met(conditions, {})  # cannot tell: not held back
    assert participation.conditions_of("") == {} and participation.conditions_of("not json") == {}
    assert set(participation.KEYS) <= set(devicestate.probe()) <= set(participation.REPORTED_KEYS)


def test_a_trigger_with_conditions_is_accepted_by_the_agent() -> None:
    from tether.agent import schedule

    t = schedule.Trigger.from_json('{"type": "interval", "seconds": 60, "conditions": {"charging": true}}')
    assert t.type == "interval" and t.interval_s == 60
