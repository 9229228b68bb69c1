"""Deliveries that sit in `notified` forever are counted (issue 14, class 5): per stage, past a deadline.

A device told about the current version that has said nothing since, for
longer than the rollout's `reportDeadlineSeconds` (default 600 s), counts as
`notReporting` in its stages' health. The pure maths is tested directly; the
contract test runs once per storage (memory and Postgres), backdating rows as
time passing would.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_storage_contract import fleet, report, spec, stored_manifest

from tether.common import errors
from tether.controller import stage_health
from tether.controller.storage import contracts
from tether.spec import staging, wire

ROLLOUT = {"version": 1, "salt": "ns/t", "stage": 0, "action": "progress", "stages": [{"percent": 100}]}


def test_the_deadline_is_a_typed_optional_field_of_the_rollout_document() -> None:
    doc = staging.parse_rollout({**ROLLOUT, "reportDeadlineSeconds": 30})
    assert doc is not None and doc.report_deadline == 30 and doc.to_json()["reportDeadlineSeconds"] == 30
    plain = staging.parse_rollout(ROLLOUT)
    assert plain is not None and plain.report_deadline == staging.DEFAULT_REPORT_DEADLINE_S
    assert "reportDeadlineSeconds" not in plain.to_json()  # older documents stay byte-equal
    assert plain.stages_hash == doc.stages_hash  # setting it restarts no cohort
    for value in (doc, plain):
        assert wire.rollout_from_proto(wire.rollout_to_proto(value)) == value


@pytest.mark.parametrize("bad", [0, -5, 7 * 24 * 3600 + 1, "60", 1.5, True])
def test_a_bad_deadline_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        staging.parse_rollout({**ROLLOUT, "reportDeadlineSeconds": bad})
    assert info.value.field == "rollout.reportDeadlineSeconds"


@dataclasses.dataclass(frozen=True)
class _Rel:
    """The few fields `stage_health.health` reads of a release."""

    version: int
    rollout: staging.Rollout | None
    stable: object = None


def test_health_counts_silent_notified_and_downloading_devices_past_the_deadline_per_stage() -> None:
    ro = staging.parse_rollout(
        {**ROLLOUT, "stage": 1, "stages": [{"percent": 10}, {"percent": 100}], "reportDeadlineSeconds": 60}
    )
    rel = _Rel(version=1, rollout=ro)

    def dev(name: str, stage: int, state: str, silent: float, version: int = 1) -> stage_health.DeviceRecord:
        return stage_health.DeviceRecord(device_id=name, stage=stage, version=version, state=state, silent_s=silent)

    devices = [
        dev("a", 0, "notified", 61.0),  # silent past the deadline
        dev("b", 0, "downloading", 600.0),  # started and went quiet
        dev("c", 1, "notified", 59.0),  # still within it
        dev("d", 1, "installed", 9999.0),  # reported
        dev("e", 1, "failed", 9999.0),  # reported
        dev("f", 1, "notified", 9999.0, version=0),  # on another version: not this one's
        dev("g", 1, "notified", 60.0),  # exactly at the deadline
    ]
    doc = stage_health.health(rel, devices=devices, results=[], stage_started={})  # type: ignore[arg-type]
    assert doc["reportDeadlineSeconds"] == 60
    assert [s["notReporting"] for s in doc["stages"]] == [2, 3]


async def _age(st: contracts.Storage, release: str, device_ids: list[str], seconds: float) -> None:
    """Make these delivery rows `seconds` old, as the clock moving on would."""
    releases = st.releases
    if hasattr(releases, "_pool"):
        async with releases._pool.connection() as conn:  # type: ignore[attr-defined]
            await conn.execute(
                "UPDATE deliveries SET updated_at = now() - make_interval(secs => %s)"
                " WHERE release = %s AND device_id = ANY(%s)",
                (seconds, release, device_ids),
            )
        return
    tables = releases._t  # type: ignore[attr-defined]
    for d in device_ids:
        row = tables.deliveries[(release, d)]
        tables.deliveries[(release, d)] = dataclasses.replace(row, updated_at=row.updated_at - seconds)


async def test_storage_counts_devices_silent_past_the_deadline(storage: contracts.Storage) -> None:
    digest = await stored_manifest(storage)
    by_id = await fleet(storage, a="android", b="android", c="android", d="android")
    await storage.releases.apply_release(spec(digest, rollout={**ROLLOUT, "reportDeadlineSeconds": 60}))
    await storage.releases.mark_notified(release="ns/t", version=1, device_ids=["a", "b", "c", "d"])
    assert await storage.releases.write_reports(
        [report(by_id["a"], state="installed"), report(by_id["b"], state="downloading")]
    ) == [None, None]

    def stage0(counts) -> dict:
        return json.loads(counts.health_json)["stages"][0]

    [counts] = await storage.releases.release_counts(["ns/t"])
    assert stage0(counts)["notReporting"] == 0  # everyone was told just now

    await _age(storage, "ns/t", ["a", "b", "c"], 120)
    [counts] = await storage.releases.release_counts(["ns/t"])
    assert stage0(counts)["notReporting"] == 2  # b (downloading) and c (notified); a installed, d fresh

    # A report is a sign of life: c reports and leaves the count.
    assert await storage.releases.write_reports([report(by_id["c"], state="installed")]) == [None]
    [counts] = await storage.releases.release_counts(["ns/t"])
    assert stage0(counts)["notReporting"] == 1


async def test_unstaged_releases_count_silent_devices_too(storage: contracts.Storage) -> None:
    """No rollout document (one plain 100 % stage): the count is still there, with the asked or default deadline."""
    digest = await stored_manifest(storage)
    by_id = await fleet(storage, a="android", b="android", c="android")
    await storage.releases.apply_release(spec(digest))
    await storage.releases.mark_notified(release="ns/t", version=1, device_ids=["a", "b", "c"])
    assert await storage.releases.write_reports([report(by_id["a"], state="downloading")]) == [None]

    [counts] = await storage.releases.release_counts(["ns/t"])
    assert (counts.not_reporting, counts.report_deadline_s, counts.health_json) == (0, 600, "")

    await _age(storage, "ns/t", ["a", "b"], 120)
    [counts] = await storage.releases.release_counts(["ns/t"])
    assert counts.not_reporting == 0  # 120 s is within the default 600 s
    [counts] = await storage.releases.release_counts(["ns/t"], report_deadline_s=60)
    assert (counts.not_reporting, counts.report_deadline_s) == (2, 60)  # a (downloading) and b; c fresh

    await _age(storage, "ns/t", ["c"], 700)
    [counts] = await storage.releases.release_counts(["ns/t"])
    assert counts.not_reporting == 1  # c, past the default

    assert await storage.releases.write_reports([report(by_id["b"], state="succeeded")]) == [None]
    [counts] = await storage.releases.release_counts(["ns/t"], report_deadline_s=60)
    assert counts.not_reporting == 2  # a and c; b reported


async def test_a_staged_release_counts_with_its_own_deadline_unless_asked(storage: contracts.Storage) -> None:
    digest = await stored_manifest(storage)
    await fleet(storage, a="android", b="android")
    await storage.releases.apply_release(spec(digest, rollout={**ROLLOUT, "reportDeadlineSeconds": 60}))
    await storage.releases.mark_notified(release="ns/t", version=1, device_ids=["a", "b"])
    await _age(storage, "ns/t", ["a"], 120)
    [counts] = await storage.releases.release_counts(["ns/t"])
    assert (counts.not_reporting, counts.report_deadline_s) == (1, 60)
    assert json.loads(counts.health_json)["stages"][0]["notReporting"] == 1  # the same count, per stage
    [counts] = await storage.releases.release_counts(["ns/t"], report_deadline_s=300)
    assert counts.not_reporting == 0


@pytest.mark.parametrize("bad", [0, -1, 7 * 24 * 3600 + 1])
async def test_get_release_status_refuses_a_bad_deadline_naming_the_field(admin_client, bad: int) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        await admin_client.get_release_status("ns/t", report_deadline_s=bad)
    assert str(info.value).startswith("report_deadline_seconds:")


async def test_get_release_status_carries_the_count_and_its_deadline(admin_client, devices_stub, tmp_path) -> None:
    from controller_helpers import enroll, make_bundle

    await enroll(devices_stub, "phone-1", {"os": "android"})
    directory, bundle = make_bundle(tmp_path / "b", files={"task.py": b"def run(ctx):\n    return {}\n"})
    await admin_client.upload_bundle(directory, bundle)
    await admin_client.apply_release(release="ns/t", manifest_digest=bundle.digest, generation=1)
    status = await admin_client.get_release_status("ns/t", report_deadline_s=45)
    assert (status.not_reporting, status.report_deadline_s) == (0, 45)
    status = await admin_client.get_release_status("ns/t")
    assert status.report_deadline_s == 600
