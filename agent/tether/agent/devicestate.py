"""The device state participation conditions are checked against: Linux probes, and what the host app reports.

Probes (`probe`, each key "true" / "false" / "unknown"; a probe never raises):

- charging: psutil's battery (`power_plugged`), else `/sys/class/power_supply`
  (a `Mains`/`USB` supply online, or a battery `Charging`/`Full`: true; a
  battery `Discharging`: false). A machine whose power-supply class lists no
  battery runs on mains: true. No psutil and no sysfs: unknown.
- idle: the 1-minute load average per core below `IDLE_LOAD_PER_CORE`, and,
  where measurable (an X display and `xprintidle`), no user input for
  `IDLE_USER_S`. Otherwise unknown.
- unmeteredNetwork: NetworkManager's `GENERAL.METERED` of the interface the
  default route leaves by (`nmcli`, when installed: "no"/"no (guessed)" is
  unmetered, "yes"/"yes (guessed)" metered), else the interface's type:
  wired Ethernet or Wi-Fi unmetered, cellular (`wwan*`, `rmnet*`, `ww*`,
  `usb*`, `qmi*`) metered, anything else (a container's veth, a VPN tunnel,
  no default route) unknown.

The host app knows better (the OS's metered flag, whether the user is
active): it reports state over the events socket
(`EventClient.report_state`, `{"state": {"charging": true, "metered":
false, "idle": true, "batteryLevel": 80}, "ttlSeconds": 300}`), and each key
it reports overrides the probe for `ttlSeconds` (default
`DEFAULT_REPORT_TTL_S`, at most `MAX_REPORT_TTL_S`), then the probe answers
again. `Conditions` holds both, caches the probe for `PROBE_TTL_S`, and
records which releases wait and why (`hold`), for the device state the agent
reports.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from tether.agent import participation
from tether.common import errors
from tether.spec import triggers

log = logging.getLogger(__name__)

IDLE_LOAD_PER_CORE = 0.5
IDLE_USER_S = 300.0
PROBE_TTL_S = 15.0
DEFAULT_REPORT_TTL_S = 600.0
MAX_REPORT_TTL_S = 3600.0
WAITING_TTL_S = 3 * participation.RECHECK_S  # a release not checked again for this long no longer waits
POWER_SUPPLY = pathlib.Path("/sys/class/power_supply")
SYS_NET = pathlib.Path("/sys/class/net")
PROC_ROUTE = pathlib.Path("/proc/net/route")
_CELLULAR_PREFIXES = ("wwan", "rmnet", "ww", "usb", "qmi", "ccmni")
_CELLULAR_DRIVERS = ("qmi_wwan", "cdc_mbim", "cdc_ncm", "rndis_host", "cdc_ether")
# What an app may report (`metered` is the opposite of `unmeteredNetwork`; `batteryLevel` a percentage).
APP_KEYS = ("charging", "idle", "metered", "unmeteredNetwork", "batteryLevel")


def _bool(value: bool | None) -> str:
    return participation.UNKNOWN if value is None else ("true" if value else "false")


def _read(path: pathlib.Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------- probes


def probe_charging(*, power_supply: pathlib.Path = POWER_SUPPLY, psutil_module: Any = None) -> tuple[str, str]:
    """("true"/"false"/"unknown", battery percent or "")."""
    ps = psutil_module
    if ps is None:
        try:
            import psutil

            ps = psutil
        except ImportError:
            pass
    if ps is not None:
        try:
            battery = ps.sensors_battery()
        except (AttributeError, OSError, NotImplementedError):
            battery = None
        if battery is not None:
            plugged = battery.power_plugged
            return _bool(None if plugged is None else bool(plugged)), f"{float(battery.percent):.0f}"
    if not power_supply.is_dir():
        return participation.UNKNOWN, ""
    batteries, mains_online = [], False
    for supply in sorted(power_supply.iterdir()):
        kind = _read(supply / "type")
        if kind == "Battery":
            batteries.append((_read(supply / "status"), _read(supply / "capacity")))
        elif kind in ("Mains", "USB", "USB_C", "Wireless") and _read(supply / "online") == "1":
            mains_online = True
    level = next((cap for _, cap in batteries if cap), "")
    if mains_online or any(status in ("Charging", "Full") for status, _ in batteries):
        return "true", level
    if not batteries:
        return "true", ""  # no battery at all: the machine runs on mains
    if any(status == "Discharging" for status, _ in batteries):
        return "false", level
    return participation.UNKNOWN, level


def probe_idle(
    *,
    loadavg: Callable[[], tuple[float, float, float]] | None = os.getloadavg,
    cores: int | None = None,
    user_idle_s: Callable[[], float | None] | None = None,
) -> str:
    """CPU load per core below `IDLE_LOAD_PER_CORE` (and no user input for `IDLE_USER_S` where measurable)."""
    try:
        load = None if loadavg is None else loadavg()[0]
    except OSError:
        load = None
    if load is None:
        return participation.UNKNOWN
    n = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    if load / max(1, n) >= IDLE_LOAD_PER_CORE:
        return "false"
    user = (user_idle_s or _x_user_idle_s)()
    return "false" if user is not None and user < IDLE_USER_S else "true"


def _x_user_idle_s() -> float | None:
    """Seconds since the last input on the X display, when there is one and `xprintidle` is installed."""
    if not os.environ.get("DISPLAY") or (tool := shutil.which("xprintidle")) is None:
        return None
    out = _run([tool])
    try:
        return int(out) / 1000.0
    except ValueError:
        return None


def _run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=2.0, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def default_route_interface(route: pathlib.Path = PROC_ROUTE) -> str:
    """The interface of the IPv4 default route ("" when there is none)."""
    for line in _read(route).splitlines()[1:]:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return fields[0]
    return ""


def probe_unmetered(
    *,
    route: pathlib.Path = PROC_ROUTE,
    sys_net: pathlib.Path = SYS_NET,
    nmcli: Callable[[str], str] | None = None,
) -> str:
    iface = default_route_interface(route)
    if not iface:
        return participation.UNKNOWN
    metered = (nmcli or _nmcli_metered)(iface).lower()
    if metered.startswith("no"):
        return "true"
    if metered.startswith("yes"):
        return "false"
    dev = sys_net / iface
    driver = os.path.basename(os.path.realpath(dev / "device" / "driver")) if (dev / "device").exists() else ""
    if iface.startswith(_CELLULAR_PREFIXES) or driver in _CELLULAR_DRIVERS:
        return "false"
    if (dev / "wireless").exists() or (dev / "phy80211").exists():
        return "true"
    if (dev / "device").exists() and _read(dev / "type") == "1":  # a physical Ethernet port
        return "true"
    return participation.UNKNOWN  # virtual (veth, tun, bridge): the link beyond is not known


def _nmcli_metered(iface: str) -> str:
    tool = shutil.which("nmcli")
    return "" if tool is None else _run([tool, "-g", "GENERAL.METERED", "device", "show", iface])


def probe() -> dict[str, str]:
    """This Linux machine's state (blocking: reads sysfs, may ask nmcli; cached by `Conditions`)."""
    charging, level = probe_charging()
    state = {"charging": charging, "idle": probe_idle(), "unmeteredNetwork": probe_unmetered()}
    if level:
        state[participation.BATTERY_KEY] = level
    return state


# ---------------------------------------------------------------- what the app reports


@dataclasses.dataclass(frozen=True)
class AppReport:
    state: Mapping[str, str]
    expires_at: float


def parse_app_report(doc: Mapping[str, Any], *, now: float) -> AppReport:
    """`{"state": {...}, "ttlSeconds": N}` from the events socket; InvalidArgument naming the field."""
    unknown = sorted(set(doc) - {"state", "ttlSeconds"})
    if unknown:
        raise errors.InvalidArgument(f"{unknown[0]}: unknown field; a state report has state and ttlSeconds")
    raw = doc.get("state")
    if not isinstance(raw, Mapping) or not raw:
        raise errors.InvalidArgument(f"state: must be a non-empty object of {list(APP_KEYS)}")
    ttl = doc.get("ttlSeconds", DEFAULT_REPORT_TTL_S)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_REPORT_TTL_S:
        raise errors.InvalidArgument(f"ttlSeconds: must be a number in (0, {MAX_REPORT_TTL_S:g}]")
    state: dict[str, str] = {}
    for key, value in raw.items():
        if key not in APP_KEYS:
            raise errors.InvalidArgument(f"state.{key}: unknown; allowed are {list(APP_KEYS)}")
        if key == participation.BATTERY_KEY:
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
                raise errors.InvalidArgument(f"state.{key}: must be a percentage from 0 to 100")
            state[key] = f"{float(value):.0f}"
            continue
        if not isinstance(value, bool) and value is not None:
            raise errors.InvalidArgument(f"state.{key}: must be true, false or null (unknown)")
        if key == "metered":
            key, value = "unmeteredNetwork", None if value is None else not value
        if key in state:
            raise errors.InvalidArgument(f"state.{key}: given twice (metered is the opposite of unmeteredNetwork)")
        state[key] = _bool(value)
    return AppReport(state=state, expires_at=now + float(ttl))


class Conditions:
    """Probe (cached) + the app's reports (until they expire) + which releases wait and why.

    `state()` is what the agent reports and checks conditions against;
    `hold(release, conditions)` decides one run: "" (go) or why it waits.
    """

    def __init__(
        self,
        *,
        probe: Callable[[], Mapping[str, str]] = probe,
        unknown: str = "wait",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if unknown not in participation.UNKNOWN_POLICIES:
            raise errors.InvalidArgument(f"conditions-unknown: {unknown!r} not in {participation.UNKNOWN_POLICIES}")
        self._probe = probe
        self.unknown = unknown
        self._clock = clock
        self._probed: tuple[float, dict[str, str]] | None = None
        self._lock = threading.Lock()
        self._refreshing = False
        self.on_report: Callable[[], object] | None = None
        self._reports: dict[str, tuple[str, float]] = {}  # key -> (value, expires at)
        self._waiting: dict[str, tuple[str, float]] = {}  # release -> (reason, checked at)

    def report(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """The app's report (events socket); the reply names what was taken and for how long."""
        now = self._clock()
        parsed = parse_app_report(doc, now=now)
        for key, value in parsed.state.items():
            self._reports[key] = (value, parsed.expires_at)
        if self.on_report is not None:
            self.on_report()  # waiting releases look again now, not at their next recheck
        log.info("device state reported by the app: %s for %.0fs", dict(parsed.state), parsed.expires_at - now)
        return {"state": dict(parsed.state), "expiresIn": parsed.expires_at - now}

    def probed(self) -> dict[str, str]:
        """The last probe. Only the first call probes in the caller; later ones refresh a stale answer in a
        background thread (a probe may ask nmcli: never on the agent's event loop) and answer the last one."""
        now = self._clock()
        with self._lock:
            last = self._probed
            stale = last is None or now - last[0] >= PROBE_TTL_S
            start = stale and last is not None and not self._refreshing
            if start:
                self._refreshing = True
        if last is None:
            self._refresh()
        elif start:
            threading.Thread(target=self._refresh, name="device-state-probe", daemon=True).start()
        with self._lock:
            assert self._probed is not None
            return dict(self._probed[1])

    def _refresh(self) -> None:
        try:
            found = {k: str(v) for k, v in self._probe().items()}
        except Exception as e:  # a probe must never stop the agent
            log.debug("device state probe failed: %s", e)
            found = {}
        with self._lock:
            self._probed = (self._clock(), found)
            self._refreshing = False

    def state(self) -> dict[str, str]:
        now = self._clock()
        state = {k: participation.UNKNOWN for k in participation.KEYS} | self.probed()
        for key, (value, expires_at) in list(self._reports.items()):
            if expires_at > now:
                state[key] = value
            else:
                del self._reports[key]
        waiting = {r: why for r, (why, at) in self._waiting.items() if now - at < WAITING_TTL_S}
        state[participation.WAITING_KEY] = triggers.waiting_summary(waiting)
        return {k: v for k, v in state.items() if k in participation.REPORTED_KEYS}

    def hold(self, release: str, conditions: Mapping[str, bool]) -> str:
        """Why `release` may not run now ("" when it may); remembered for the state report."""
        reason = participation.waiting_reason(conditions, self.state(), unknown=self.unknown)
        if reason:
            if self._waiting.get(release, ("",))[0] != reason:
                log.info("%s waits: %s", release, reason)
            self._waiting[release] = (reason, self._clock())
        else:
            self._waiting.pop(release, None)
        return reason
