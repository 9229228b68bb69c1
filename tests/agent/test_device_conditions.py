"""Device conditions that hold: Linux probes, the app's reports overriding them for a while, unknown -> waiting
with the reason (and `--conditions-unknown run`), and the controller told who waits and why."""

from __future__ import annotations

import asyncio
import pathlib
import random
import shutil
import tempfile
import types

import pytest

from tether.agent import devicestate, events, participation
from tether.common import errors

UNKNOWN = participation.UNKNOWN


# ---------------------------------------------------------------- the decision (pure)


@pytest.mark.parametrize(
    ("state", "policy", "reason"),
    [
        ({"charging": "true", "idle": "true"}, "wait", ""),
        ({"charging": "false", "idle": "true"}, "wait", "not charging"),
        ({"charging": "true"}, "wait", "idle unknown"),  # absent is unknown
        ({"charging": UNKNOWN, "idle": "false"}, "wait", "charging unknown; not idle"),
        ({"charging": UNKNOWN, "idle": UNKNOWN}, "run", ""),
        ({"charging": "false", "idle": UNKNOWN}, "run", "not charging"),
    ],
)
def test_waiting_reason(state, policy, reason) -> None:
    assert participation.waiting_reason({"charging": True, "idle": True}, state, unknown=policy) == reason


def test_unrequired_conditions_never_hold_a_run_back() -> None:
    assert participation.waiting_reason({"charging": False}, {"charging": "false"}) == ""
    assert participation.waiting_reason({}, {}) == ""


# ---------------------------------------------------------------- probes


def _supply(root: pathlib.Path, name: str, **files: str) -> None:
    (root / name).mkdir(parents=True)
    for key, value in files.items():
        (root / name / key).write_text(value + "\n")


NO_PSUTIL = types.SimpleNamespace(sensors_battery=lambda: None)


def test_charging_from_sysfs(tmp_path) -> None:
    laptop = tmp_path / "laptop"
    _supply(laptop, "BAT0", type="Battery", status="Discharging", capacity="57")
    _supply(laptop, "AC", type="Mains", online="0")
    assert devicestate.probe_charging(power_supply=laptop, psutil_module=NO_PSUTIL) == ("false", "57")
    (laptop / "AC" / "online").write_text("1\n")
    assert devicestate.probe_charging(power_supply=laptop, psutil_module=NO_PSUTIL) == ("true", "57")
    full = tmp_path / "full"
    _supply(full, "BAT1", type="Battery", status="Full", capacity="100")
    assert devicestate.probe_charging(power_supply=full, psutil_module=NO_PSUTIL)[0] == "true"
    mains_only = tmp_path / "desktop"
    mains_only.mkdir()
    assert devicestate.probe_charging(power_supply=mains_only, psutil_module=NO_PSUTIL) == ("true", "")
    assert devicestate.probe_charging(power_supply=tmp_path / "none", psutil_module=NO_PSUTIL)[0] == UNKNOWN


def test_charging_from_psutil_first(tmp_path) -> None:
    battery = types.SimpleNamespace(power_plugged=False, percent=12.4)
    ps = types.SimpleNamespace(sensors_battery=lambda: battery)
    assert devicestate.probe_charging(power_supply=tmp_path / "none", psutil_module=ps) == ("false", "12")
    unsure = types.SimpleNamespace(sensors_battery=lambda: types.SimpleNamespace(power_plugged=None, percent=50))
    assert devicestate.probe_charging(power_supply=tmp_path / "none", psutil_module=unsure)[0] == UNKNOWN


def test_idle_from_load_and_user_input() -> None:
    def low() -> tuple[float, float, float]:
        return (0.2, 0.2, 0.2)

    def high() -> tuple[float, float, float]:
        return (3.0, 3.0, 3.0)

    def broken() -> tuple[float, float, float]:
        raise OSError("no loadavg")

    assert devicestate.probe_idle(loadavg=high, cores=2, user_idle_s=lambda: None) == "false"
    assert devicestate.probe_idle(loadavg=low, cores=2, user_idle_s=lambda: None) == "true"
    assert devicestate.probe_idle(loadavg=low, cores=2, user_idle_s=lambda: 12.0) == "false"  # someone typed
    assert devicestate.probe_idle(loadavg=low, cores=2, user_idle_s=lambda: 900.0) == "true"
    assert devicestate.probe_idle(loadavg=broken, cores=2) == UNKNOWN


def _net(tmp_path: pathlib.Path, iface: str, *parts: str) -> tuple[pathlib.Path, pathlib.Path]:
    route = tmp_path / "route"
    route.write_text(
        f"Iface\tDestination\tGateway\tFlags\n{iface}\t00000000\t0102A8C0\t0003\n{iface}\t0002A8C0\t00000000\t0001\n"
    )
    sys_net = tmp_path / "net"
    (sys_net / iface).mkdir(parents=True)
    for part in parts:
        if part == "ethernet":
            (sys_net / iface / "device").mkdir()
            (sys_net / iface / "type").write_text("1\n")
        else:
            (sys_net / iface / part).mkdir()
    return route, sys_net


@pytest.mark.parametrize(
    ("iface", "parts", "nmcli", "expected"),
    [
        ("eth0", ("ethernet",), "", "true"),
        ("wlan0", ("wireless",), "", "true"),
        ("wlan0", ("wireless",), "yes (guessed)", "false"),  # NetworkManager knows it is a hotspot
        ("wwan0", (), "", "false"),
        ("eth0", ("ethernet",), "yes", "false"),
        ("enp3s0", ("ethernet",), "no", "true"),
        ("veth1a2b", (), "unknown", UNKNOWN),  # a container's link: what lies beyond is not known
        ("tun0", (), "", UNKNOWN),
    ],
)
def test_unmetered_network(tmp_path, iface, parts, nmcli, expected) -> None:
    route, sys_net = _net(tmp_path, iface, *parts)
    asked = []

    def ask(name: str) -> str:
        asked.append(name)
        return nmcli

    assert devicestate.probe_unmetered(route=route, sys_net=sys_net, nmcli=ask) == expected
    assert asked == [iface]


def test_no_default_route_is_unknown(tmp_path) -> None:
    route = tmp_path / "route"
    route.write_text("Iface\tDestination\tGateway\n")
    assert devicestate.probe_unmetered(route=route, sys_net=tmp_path, nmcli=lambda i: "no") == UNKNOWN


# ---------------------------------------------------------------- probe + app reports + waiting


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unknown_waits_by_default_with_the_reason_and_run_lets_it_through() -> None:
    clock = Clock()
    waits = devicestate.Conditions(probe=dict, clock=clock)  # a device that can tell nothing
    assert waits.state() == {"charging": UNKNOWN, "unmeteredNetwork": UNKNOWN, "idle": UNKNOWN, "waiting": ""}
    assert waits.hold("ns/train", {"charging": True, "unmeteredNetwork": True}) == (
        "charging unknown; unmeteredNetwork unknown"
    )
    assert waits.state()["waiting"] == "ns/train: charging unknown; unmeteredNetwork unknown"
    runs = devicestate.Conditions(probe=dict, unknown="run", clock=clock)
    assert runs.hold("ns/train", {"charging": True}) == "" and runs.state()["waiting"] == ""
    with pytest.raises(errors.InvalidArgument, match="conditions-unknown"):
        devicestate.Conditions(probe=dict, unknown="maybe")


def test_the_app_report_overrides_the_probe_for_its_ttl_then_the_probe_answers_again() -> None:
    clock = Clock()
    kicks = []
    c = devicestate.Conditions(probe=lambda: {"charging": "false", "idle": "true"}, clock=clock)
    c.on_report = lambda: kicks.append(clock.now)
    assert c.hold("ns/a", {"charging": True}) == "not charging"
    reply = c.report({"state": {"charging": True, "metered": False, "batteryLevel": 81.6}, "ttlSeconds": 120})
    assert reply == {
        "state": {"charging": "true", "unmeteredNetwork": "true", "batteryLevel": "82"},
        "expiresIn": 120.0,
    }
    assert kicks == [1000.0]  # waiting releases are looked at again now
    assert c.hold("ns/a", {"charging": True, "unmeteredNetwork": True}) == ""
    assert c.state()["waiting"] == "" and c.state()["batteryLevel"] == "82"
    clock.now += 121
    c._refresh()  # the probe, as its background refresh would
    assert c.state()["charging"] == "false" and c.state()["unmeteredNetwork"] == UNKNOWN
    assert c.hold("ns/a", {"charging": True}) == "not charging"
    c.report({"state": {"charging": None}})  # the app cannot tell after all: unknown, for the default TTL
    assert c.hold("ns/a", {"charging": True}) == "charging unknown"


def test_a_release_no_longer_checked_stops_waiting() -> None:
    clock = Clock()
    c = devicestate.Conditions(probe=dict, clock=clock)
    c.hold("ns/gone", {"idle": True})
    assert "ns/gone" in c.state()["waiting"]
    clock.now += devicestate.WAITING_TTL_S + 1
    assert c.state()["waiting"] == ""


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"state": {"charging": "yes"}}, "state.charging"),
        ({"state": {"wifi": True}}, "state.wifi"),
        ({"state": {"batteryLevel": 140}}, "state.batteryLevel"),
        ({"state": {"metered": True, "unmeteredNetwork": True}}, "state.unmeteredNetwork"),
        ({"state": {}}, "state"),
        ({"state": {"idle": True}, "ttlSeconds": 10**6}, "ttlSeconds"),
        ({"state": {"idle": True}, "ttlSeconds": True}, "ttlSeconds"),
        ({"state": {"idle": True}, "until": 5}, "until"),
    ],
)
def test_bad_app_reports_are_refused_naming_the_field_and_change_nothing(doc, field) -> None:
    c = devicestate.Conditions(probe=lambda: {"idle": "false"}, clock=Clock())
    with pytest.raises(errors.InvalidArgument) as e:
        c.report(doc)
    assert str(e.value).startswith(field)
    assert c.state()["idle"] == "false"


def test_a_failing_probe_is_unknown_not_a_crash() -> None:
    def boom() -> dict[str, str]:
        raise RuntimeError("sysfs went away")

    c = devicestate.Conditions(probe=boom, clock=Clock())
    assert c.state()["charging"] == UNKNOWN and c.hold("ns/a", {"charging": True}) == "charging unknown"


def test_this_machine_probes_without_raising() -> None:
    state = devicestate.probe()
    assert set(participation.KEYS) <= set(state) and all(
        state[k] in ("true", "false", UNKNOWN) for k in participation.KEYS
    )


# ---------------------------------------------------------------- the events socket


async def test_the_app_reports_state_over_the_events_socket(tmp_path) -> None:
    from tether.agent.stream import processor
    from tether.agent.stream.endpoint import EventServer
    from tether.agent.stream.eventstore import EventStore

    sock_dir = pathlib.Path(tempfile.mkdtemp(prefix="tds-", dir="/tmp"))
    c = devicestate.Conditions(probe=lambda: {"charging": "false"}, clock=Clock())
    srv = EventServer(
        processor.StreamProcessor(EventStore(tmp_path / "e.db")), sock_dir / "events.sock", state_report=c.report
    )
    await srv.start()
    try:

        def app() -> tuple[events.StateAck, str, events.Ack]:
            with events.EventClient(srv.path) as client:
                ack = client.report_state(charging=True, idle=False, battery_level=40, ttl_s=60)
                try:
                    client.report_state(charging=True, ttl_s=-1)
                    bad = ""
                except events.EventError as e:
                    bad = str(e)
                return ack, bad, client.send("page_view", page="home")  # events still flow on the connection

        ack, bad, event_ack = await asyncio.to_thread(app)
    finally:
        await srv.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert ack.state == {"charging": "true", "idle": "false", "batteryLevel": "40"} and ack.expires_in_s == 60
    assert bad.startswith("ttlSeconds") and event_ack.accepted == 1
    assert c.state()["charging"] == "true"


# ---------------------------------------------------------------- the agent and the real controller


async def test_unknown_conditions_wait_with_the_reason_until_the_app_reports_them(controller, tmp_path) -> None:
    from agent_fakes import write_bundle
    from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN

    from tether.agent import client, daemon
    from tether.common import admin_client, bundle_files

    sock_dir = pathlib.Path(tempfile.mkdtemp(prefix="tdc-", dir="/tmp"))
    device = daemon.Agent(
        controller=controller.address,
        state_dir=tmp_path / "phone",
        data_dir=tmp_path / "data",
        bootstrap_token=BOOTSTRAP_TOKEN,
        device_id="phone-1",
        attributes={"app": "shop"},
        backends=["mnn/cpu"],
        backoff=client.Backoff(initial_s=0.05, max_s=0.5),
        rng=random.Random(0),
        device_state=lambda: {"idle": "true"},  # this device cannot tell whether it is charging
        events_socket=sock_dir / "events.sock",
        backend_selection=False,
    )
    bundle_dir = write_bundle(tmp_path / "task", "def run(ctx):\n    return {'sample_count': 1}\n")
    run = asyncio.create_task(device.run())
    try:
        async with admin_client.AdminClient(target=controller.address, token=ADMIN_TOKEN) as adm:
            bundle = bundle_files.build_manifest(bundle_dir)
            await adm.upload_bundle(bundle_dir, bundle)
            await adm.apply_release(
                release="default/nightly",
                manifest_digest=bundle.digest,
                trigger={"type": "onInstall", "conditions": {"charging": True, "idle": True}},
            )

            async def listed() -> dict[str, str]:
                (d,) = await adm.list_devices()
                return dict(d.device_state)

            async def until(predicate, timeout: float = 60.0) -> None:
                deadline = asyncio.get_running_loop().time() + timeout
                while not await predicate():
                    assert asyncio.get_running_loop().time() < deadline, "timed out"
                    await asyncio.sleep(0.1)

            async def waiting() -> bool:
                return (await listed()).get("waiting") == "default/nightly: charging unknown"

            await until(waiting)  # the controller is told who waits and why
            state = await listed()
            assert (state["charging"], state["idle"]) == (UNKNOWN, "true")
            status = await adm.get_release_status("default/nightly")
            assert status.succeeded == 0 and not device.state.runs_of("default/nightly")

            def app() -> None:
                with events.EventClient(sock_dir / "events.sock") as c:
                    c.report_state(charging=True, ttl_s=600)

            await asyncio.to_thread(app)

            async def succeeded() -> bool:
                return (await adm.get_release_status("default/nightly")).succeeded == 1

            await until(succeeded)  # the report kicks the waiting release: no minute-long recheck
            assert (await listed()).get("waiting") == "" and (await listed())["charging"] == "true"
    finally:
        device.stop()
        await run
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_tether_agent_conditions_prints_what_the_probes_tell() -> None:
    import json

    from click.testing import CliRunner

    from tether.cli.main import cli

    result = CliRunner().invoke(cli, ["agent", "conditions", "--json"])
    assert result.exit_code == 0, result.output
    state = json.loads(result.output)
    assert all(state[k] in ("true", "false", UNKNOWN) for k in participation.KEYS)
