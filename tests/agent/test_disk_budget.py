"""The agent's disk budget: size parsing, the budget maths, eviction order, refusal, and the daemon's handling.

Store-level tests use real files; the daemon is tested against the scriptable fake controller and, once,
against the real controller (gRPC on loopback, embedded Postgres).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random

import pytest
from agent_fakes import BOOTSTRAP, wait_until, write_bundle
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN

from tether.agent import bundles, client, daemon, diskbudget, sizes
from tether.cli.agent_cmd import agent as agent_cli
from tether.common import errors, manifest

FAST = client.Backoff(initial_s=0.02, max_s=0.2)
TICK = "def run(ctx):\n    return {'sample_count': 1}\n"


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        (1048576, 1048576),
        ("500MB", 500_000_000),
        ("500 mb", 500_000_000),
        ("2GiB", 2 * 1024**3),
        ("2Gi", 2 * 1024**3),
        ("1.5G", 1536 * 1024**2),
        ("10kB", 10_000),
        ("10KiB", 10_240),
        ("1T", 1024**4),
        ("12B", 12),
        ("unlimited", None),
        ("None", None),
    ],
)
def test_sizes_parse(text, expected) -> None:
    assert sizes.parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is not a size"),
        ("lots", "is not a size"),
        ("-1MB", "is not a size"),
        ("1e9", "is not a size"),
        ("5 parsecs", "unknown unit 'parsecs'"),
        ("5MBs", "unknown unit 'mbs'"),
        ("0", "must be more than 0 bytes"),
        ("0.1B", "must be more than 0 bytes"),
    ],
)
def test_bad_sizes_say_what_is_wrong(text, says) -> None:
    with pytest.raises(errors.InvalidArgument, match="disk budget: ") as info:
        sizes.parse_size(text)
    assert says in str(info.value)
    assert "500MB" in str(info.value) or "GiB" in str(info.value) or "unlimited" in str(info.value)


def test_sizes_format_exactly_when_they_can() -> None:
    assert [sizes.format_size(n) for n in (0, 12, 1024, 1536, 500_000_000, 1024**3, 123_456_789)] == [
        "0 B",
        "12 B",
        "1 KiB",
        "1.5 KiB",
        "500 MB",
        "1 GiB",
        "117.7 MiB",
    ]


def test_cli_flag_default_env_and_errors(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    run = agent_cli.commands["run"]
    option = next(p for p in run.params if p.name == "disk_budget")
    ctx = run.make_context("run", [], resilient_parsing=True)
    assert option.process_value(ctx, option.get_default(ctx)) == sizes.DEFAULT_DISK_BUDGET == 1024**3
    assert option.envvar == sizes.ENV_DISK_BUDGET

    result = CliRunner().invoke(agent_cli, ["run", "--disk-budget", "5 parsecs"])
    assert result.exit_code == 2
    assert "Invalid value for '--disk-budget': unknown unit 'parsecs'" in result.output

    # `tether agent disk` shows what the store holds against the budget.
    m, blobs = make_bundle(tmp_path, {"task.py": TICK.encode(), "w.bin": b"w" * 5000})
    s = bundles.BundleStore(tmp_path / "state")
    fill(s, blobs)
    s.install("ns/a", 1, m)
    result = CliRunner().invoke(agent_cli, ["disk", "--state-dir", str(tmp_path / "state"), "--disk-budget", "1MiB"])
    assert result.exit_code == 0, result.output
    assert "of 1 MiB" in result.output and "ns/a v1 (running)" in result.output
    monkeypatch.setenv(sizes.ENV_DISK_BUDGET, "unlimited")
    result = CliRunner().invoke(agent_cli, ["disk", "--state-dir", str(tmp_path / "state"), "--json"])
    assert '"budget": null' in result.output and '"role": "running"' in result.output


# ---------------------------------------------------------------- the budget maths (no files)


def install(digests: set[str], own: int = 0, mtime: float = 0.0) -> diskbudget.InstallSize:
    return diskbudget.InstallSize(digests=frozenset(digests), own_bytes=own, mtime=mtime)


def test_need_is_what_is_missing_less_partials_plus_the_install_files() -> None:
    snap = diskbudget.StoreSnapshot(
        blobs={"a": 100, "b": 50},
        partials={"n1": 30, "n3": 999},
        installs={("r", 1): install({"a"}, own=10)},
        current={"r": 1},
    )
    assert snap.total == 100 + 50 + 30 + 999 + 10
    sizes = {"a": 100, "n1": 80, "n2": 20, "n3": 40}  # n3's partial is longer than the blob: it starts over

    def plan(budget: int | None) -> diskbudget.RoomPlan:
        return diskbudget.plan_room(snap, release="r", version=2, sizes=sizes, overhead=5, budget=budget)

    assert plan(None).need == (80 - 30) + 20 + 40 + 5
    exact = snap.total + 115
    assert plan(exact) == diskbudget.RoomPlan(
        fits=True, need=115, used=snap.total, reserved=0, after=snap.total, budget=exact
    )
    # One byte less: the unreferenced blob b and the useless partial n3 go first (and suffice).
    short = plan(exact - 1)
    assert (short.fits, short.gc, short.evict, short.after) == (True, True, (), snap.total - 50 - 999)
    # Nothing to fetch: fits even over the budget (nothing grows).
    assert diskbudget.plan_room(snap, release="r", version=1, sizes={"a": 100}, budget=1).fits


@pytest.mark.parametrize(
    ("budget", "evicted"),
    [
        (810, ()),  # fits as it is
        (800, ()),  # the unreferenced blob suffices
        (710, (("s", 2),)),  # then versions that are neither running nor a rollback target, oldest first
        (610, (("s", 2), ("r", 1))),
        (510, (("s", 2), ("r", 1), ("t", 1))),  # then rollback targets, oldest first
        (410, (("s", 2), ("r", 1), ("t", 1), ("s", 4))),
        (399, None),  # the running versions alone leave no room: refused, nothing removed
    ],
)
def test_eviction_order(budget, evicted) -> None:
    versions = {("r", 1): 2, ("r", 3): 9, ("s", 2): 1, ("s", 4): 4, ("s", 5): 9, ("t", 1): 3, ("t", 2): 9}
    snap = diskbudget.StoreSnapshot(
        blobs={"x": 10, **{f"{r}{v}": 100 for r, v in versions}},
        partials={},
        installs={(r, v): install({f"{r}{v}"}, mtime=t) for (r, v), t in versions.items()},
        current={"r": 3, "s": 5, "t": 2},
    )
    plan = diskbudget.plan_room(snap, release="r", version=4, sizes={"new": 100}, budget=budget)
    if evicted is None:
        assert not plan.fits and plan.evict == () and plan.after == 300
        assert plan.message == (
            "disk budget 399 B exceeded: r v4 needs 100 B more, 300 B in use (running versions: r v3, s v5, t v2);"
            " raise --disk-budget or remove releases from this device"
        )
    else:
        assert plan.fits and plan.evict == evicted and plan.gc == (budget < 810)
        assert plan.after + plan.need <= budget


def test_a_rollback_to_an_older_version_keeps_what_its_install_would_keep() -> None:
    # Running v5 of r, v3 kept; the release goes back to v2 (not kept): its install keeps v2 and v1.
    snap = diskbudget.StoreSnapshot(
        blobs={"r1": 100, "r3": 100, "r5": 100},
        partials={},
        installs={("r", 1): install({"r1"}, mtime=1), ("r", 3): install({"r3"}, mtime=2), ("r", 5): install({"r5"})},
        current={"r": 5},
    )
    plan = diskbudget.plan_room(snap, release="r", version=2, sizes={"r2": 100}, budget=300)
    assert plan.evict == (("r", 3),)  # v1 is what v2 will roll back to: it goes last
    plan = diskbudget.plan_room(snap, release="r", version=2, sizes={"r2": 100}, budget=200)
    assert plan.evict == (("r", 3), ("r", 1))


def test_shared_blobs_free_nothing_and_other_downloads_keep_their_room() -> None:
    snap = diskbudget.StoreSnapshot(
        blobs={"big": 500, "c": 100},
        partials={"o": 50},
        installs={("r", 1): install({"big"}, mtime=1), ("r", 2): install({"c"}, mtime=2)},
        current={"r": 2},
    )
    # r v1 shares `big` with v3: removing it frees nothing, so v3 does not fit in 849 and nothing is removed.
    # Another release is downloading `o` (200 declared, 50 here): it keeps its partial and 150 more.
    kw = {"release": "r", "version": 3, "sizes": {"big": 500, "n": 50}, "keep": {"o"}, "reserved": {"o": 200}}
    refused = diskbudget.plan_room(snap, budget=849, **kw)
    assert (refused.fits, refused.need, refused.reserved, refused.after, refused.evict) == (False, 50, 150, 650, ())
    assert "50 B more, 650 B in use" in refused.message and "150 B reserved for other downloads" in refused.message
    assert diskbudget.plan_room(snap, budget=850, **kw).fits
    alone = diskbudget.plan_room(snap, release="r", version=3, sizes={"big": 500, "n": 50}, budget=650)
    assert (alone.fits, alone.gc, alone.evict) == (True, True, ())  # without the other download, `o` is garbage
    whole = diskbudget.plan_room(snap, release="r", version=3, sizes={"huge": 10_000}, budget=1000)
    assert not whole.fits and "needs 10 kB more, more than the whole budget" in whole.message


# ---------------------------------------------------------------- the store on disk


def make_bundle(tmp_path: pathlib.Path, files: dict[str, bytes]) -> tuple[manifest.Manifest, dict[str, bytes]]:
    root = tmp_path / f"src-{len(list(tmp_path.iterdir()))}"
    root.mkdir()
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    m = manifest.hash_directory(root, name="b", entrypoint="task.py")
    return m, {f.sha256: (root / f.path).read_bytes() for f in m.files}


def fill(s: bundles.BundleStore, blobs: dict[str, bytes]) -> None:
    for digest, data in blobs.items():
        if not s.has_blob(digest):
            s.put_blob(digest, data)


def listing(s: bundles.BundleStore) -> dict[str, int]:
    return {
        str(p.relative_to(s.root)): p.stat().st_size
        for p in sorted(s.root.rglob("*"))
        if p.is_file() and p.parent != s.root  # state.json and friends are not the store's
    }


def installed(s: bundles.BundleStore, tmp_path: pathlib.Path, release: str, version: int, payload: bytes):
    m, blobs = make_bundle(tmp_path, {"task.py": TICK.encode() + f"# {release} {version}\n".encode(), "w.bin": payload})
    fill(s, blobs)
    s.install(release, version, m)
    return m


def test_usage_counts_each_file_once(tmp_path) -> None:
    s = bundles.BundleStore(tmp_path / "state")
    m = installed(s, tmp_path, "ns/a", 1, b"w" * 10_000)
    blob_bytes = sum({f.sha256: f.size for f in m.files}.values())
    assert s.snapshot().total == blob_bytes + len(m.canonical_bytes()) == blob_bytes + s.install_overhead(m)
    with s.open_blob("sha256:" + "ab" * 32, expected_size=100) as w:
        w.write(b"p" * 40)  # an interrupted download
    (s.release_dir("ns/a") / ".staging-2-x").mkdir()
    (s.release_dir("ns/a") / ".staging-2-x" / "f").write_bytes(b"s" * 7)
    snap = s.snapshot()
    assert snap.total == blob_bytes + len(m.canonical_bytes()) + 40 + 7
    doc = snap.to_json(1000)
    assert (doc["blobs"], doc["partial"], doc["used"], doc["budget"]) == (blob_bytes, 40, snap.total, 1000)
    assert doc["versions"] == [{"release": "ns/a", "version": 1, "role": "running", "bytes": s.snapshot().total - 47}]
    assert snap.describe(None).startswith(f"{sizes.format_size(snap.total)}: blobs ")


def test_refusal_leaves_the_store_unchanged(tmp_path) -> None:
    s = bundles.BundleStore(tmp_path / "state")
    installed(s, tmp_path, "ns/a", 1, b"1" * 10_000)
    installed(s, tmp_path, "ns/a", 2, b"2" * 10_000)  # v1 is kept for rollback
    s.put_blob(manifest.sha256_digest(b"stray"), b"stray")  # unreferenced
    big, _ = make_bundle(tmp_path, {"task.py": TICK.encode(), "w.bin": b"3" * 50_000})
    before = listing(s)
    with pytest.raises(diskbudget.DiskBudgetExceeded) as info:
        s.make_room("ns/a", 3, big, budget=55_000)
    assert listing(s) == before
    assert info.value.manifest is big and not info.value.plan.fits
    assert str(info.value).startswith("disk budget 55 kB exceeded: ns/a v3 needs 49.2 KiB more, 10.")
    assert "running versions: ns/a v2" in str(info.value)
    assert s.rollback("ns/a") == 1  # the rollback copy is still there


def test_make_room_frees_in_order_and_the_install_fits(tmp_path) -> None:
    s = bundles.BundleStore(tmp_path / "state")
    installed(s, tmp_path, "ns/a", 1, b"1" * 10_000)
    installed(s, tmp_path, "ns/a", 2, b"2" * 10_000)
    installed(s, tmp_path, "ns/b", 1, b"b" * 10_000)
    stray = manifest.sha256_digest(b"stray" * 100)
    s.put_blob(stray, b"stray" * 100)
    partial = "sha256:" + "cd" * 32
    with s.open_blob(partial, expected_size=10_000) as w:
        w.write(b"x" * 5000)  # a download of a version no longer wanted
    m, blobs = make_bundle(tmp_path, {"task.py": TICK.encode(), "w.bin": b"n" * 12_000})
    used = s.snapshot().total
    budget = used - 5000 - 500 + 12_000  # the garbage alone is not enough: a's rollback copy must go too
    plan = s.make_room("ns/b", 2, m, budget=budget)
    assert plan.gc and plan.evict == (("ns/a", 1),)
    assert not s.has_blob(stray) and s.partial_size(partial) == 0
    assert s.versions("ns/a") == [2] and s.current("ns/a") == 2 and s.versions("ns/b") == [1]
    fill(s, blobs)
    s.install("ns/b", 2, m)
    assert s.snapshot().total <= budget
    assert s.versions("ns/b") == [1, 2]  # b's own rollback copy is kept


def test_switching_back_to_a_kept_version_needs_nothing(tmp_path) -> None:
    s = bundles.BundleStore(tmp_path / "state")
    m1 = installed(s, tmp_path, "ns/a", 1, b"1" * 10_000)
    installed(s, tmp_path, "ns/a", 2, b"2" * 10_000)
    before = listing(s)
    plan = s.make_room("ns/a", 1, m1, budget=1)  # far over budget already: a rollback still goes ahead
    assert (plan.fits, plan.need, plan.evict) == (True, 0, ()) and listing(s) == before
    # The same bundle as a new version (a policy change) costs only its manifest copy.
    assert s.plan_room("ns/a", 3, m1, budget=None).need == s.install_overhead(m1) == len(m1.canonical_bytes())


def test_the_running_version_is_never_removed(tmp_path) -> None:
    s = bundles.BundleStore(tmp_path / "state")
    installed(s, tmp_path, "ns/a", 1, b"1" * 10_000)
    with pytest.raises(errors.FailedPrecondition):
        s._remove_install("ns/a", 1)
    assert s.current_dir("ns/a") is not None


# ---------------------------------------------------------------- the daemon (fake controller)


def make_agent(fake, tmp_path: pathlib.Path, *, budget: int | None) -> daemon.Agent:
    return daemon.Agent(
        controller=fake.address,
        state_dir=tmp_path / "dev" / "state",
        data_dir=tmp_path / "dev" / "data",
        bootstrap_token=BOOTSTRAP,
        device_id="dev-1",
        backends=["mnn/cpu"],
        backoff=FAST,
        rng=random.Random(0),
        backend_selection=False,
        disk_budget=budget,
    )


def states_of(fake, release: str, version: int) -> list[str]:
    """Without DOWNLOADING: a progress report only sent for installs running past 1 s."""
    return [s for _, r, v, s, _ in fake.statuses if r == release and v == version and s != "DOWNLOADING"]


async def test_a_version_over_the_budget_is_reported_and_the_installed_one_keeps_running(fake, tmp_path) -> None:
    tick = {"type": "interval", "seconds": 1}
    v1 = fake.publish("ns/t", write_bundle(tmp_path / "b1", TICK, extra={"w.bin": os.urandom(30_000)}), trigger=tick)
    agent = make_agent(fake, tmp_path, budget=60_000)
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: any(u.version == 1 for u in fake.uploads.values()))
        big = os.urandom(40_000)
        v2 = fake.publish("ns/t", write_bundle(tmp_path / "b2", TICK, extra={"w.bin": big}))
        await wait_until(lambda: "FAILED" in fake.states(v2.name))
        (message,) = [m for _, _, v, s, m in fake.statuses if v == 2 and s == "FAILED"]
        assert message.startswith("disk budget 60 kB exceeded: ns/t v2 needs 39.")
        assert "running versions: ns/t v1" in message

        # Still v1, still running on its interval; nothing of v2 was downloaded; the refusal is reported once.
        uploads = sum(u.version == 1 for u in fake.uploads.values())
        measured = 0
        plan_room = agent.store.plan_room

        def counted(*args, **kwargs):
            nonlocal measured
            measured += 1
            return plan_room(*args, **kwargs)

        agent.store.plan_room = counted
        agent._kick("ns/t")
        await wait_until(lambda: sum(u.version == 1 for u in fake.uploads.values()) >= uploads + 2, timeout=10)
        assert measured == 0  # the store did not change: the refusal stands without walking it on every pass
        assert agent.store.current("ns/t") == v1.version and agent.state.installed["ns/t"].version == 1
        digest = manifest.sha256_digest(big)
        assert digest not in {d for d, _ in fake.pulls} and not agent.store.has_blob(digest)
        assert list(agent.store.partials.iterdir()) == [] and agent.store.snapshot().total <= 60_000
        assert states_of(fake, "ns/t", 2) == ["FAILED"]

        # A version that fits (the desired state changed) installs; the old one stays for rollback.
        v3 = fake.publish("ns/t", write_bundle(tmp_path / "b3", TICK, extra={"w.bin": os.urandom(20_000)}))
        await wait_until(lambda: "INSTALLED" in fake.states(v3.name) and agent.store.current("ns/t") == 3)
        assert agent.store.versions("ns/t") == [1, 3] and agent.store.snapshot().total <= 60_000
        await wait_until(lambda: "ns/t" not in agent.installer.blocked)  # forgotten once a version installs
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=15)


async def test_room_is_made_by_dropping_the_rollback_copy_of_another_release(fake, tmp_path) -> None:
    fake.publish("ns/a", write_bundle(tmp_path / "a1", TICK, extra={"w.bin": os.urandom(30_000)}))
    agent = make_agent(fake, tmp_path, budget=80_000)
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: "SUCCEEDED" in states_of(fake, "ns/a", 1))
        fake.publish("ns/a", write_bundle(tmp_path / "a2", TICK, extra={"w.bin": os.urandom(30_000)}))
        await wait_until(lambda: "SUCCEEDED" in states_of(fake, "ns/a", 2))
        assert agent.store.versions("ns/a") == [1, 2]
        fake.publish("ns/b", write_bundle(tmp_path / "b1", TICK, extra={"w.bin": os.urandom(30_000)}))
        await wait_until(lambda: "SUCCEEDED" in states_of(fake, "ns/b", 1))
        assert agent.store.versions("ns/a") == [2]  # a's rollback copy made room for b
        assert agent.store.snapshot().total <= 80_000 and "FAILED" not in fake.states("ns/b")
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=15)


async def test_a_server_sending_more_than_the_manifest_says_cannot_exceed_the_budget(fake, tmp_path) -> None:
    rel = fake.publish("ns/t", write_bundle(tmp_path / "b", TICK, extra={"w.bin": b"w" * 10_000}))
    digest = next(d for d, data in fake.blobs.items() if data == b"w" * 10_000)
    fake.blobs[digest] = b"w" * 200_000  # the manifest (its digest checks out) declares 10,000 bytes
    agent = make_agent(fake, tmp_path, budget=50_000)
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: "REFUSED" in fake.states(rel.name))
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=15)
    assert agent.store.snapshot().total <= 50_000
    assert agent.store.partial_size(digest) == 0 and not agent.store.has_blob(digest)
    assert agent.store.current("ns/t") is None


# ---------------------------------------------------------------- the daemon and the real controller


async def test_refused_for_space_is_visible_on_the_controller_and_the_old_version_keeps_working(
    controller, tmp_path
) -> None:
    from tether.common import admin_client, bundle_files

    async def query(sql: str, *args) -> list[tuple]:
        async with controller.pool.connection() as conn:
            return await (await conn.execute(sql, args)).fetchall()

    device = daemon.Agent(
        controller=controller.address,
        state_dir=tmp_path / "phone" / "state",
        data_dir=tmp_path / "phone" / "data",
        bootstrap_token=BOOTSTRAP_TOKEN,
        device_id="phone-1",
        attributes={"app": "shop"},
        backends=["mnn/cpu"],
        backoff=FAST,
        rng=random.Random(0),
        backend_selection=False,
        disk_budget=sizes.parse_size("100KB"),
    )
    run = asyncio.create_task(device.run())
    try:
        async with admin_client.AdminClient(target=controller.address, token=ADMIN_TOKEN) as adm:
            await wait_until(lambda: device.connected.is_set())

            async def apply(directory: pathlib.Path) -> int:
                bundle = bundle_files.build_manifest(directory)
                await adm.upload_bundle(directory, bundle)
                applied = await adm.apply_release(
                    release="default/tick", manifest_digest=bundle.digest, trigger={"type": "interval", "seconds": 1}
                )
                return applied.version

            async def results(version: int) -> int:
                rows = await query(
                    "SELECT count(*) FROM results WHERE release = %s AND version = %s", "default/tick", version
                )
                return rows[0][0]

            v1 = await apply(write_bundle(tmp_path / "v1", TICK, extra={"w.bin": os.urandom(60_000)}))
            for _ in range(300):
                if await results(v1) >= 1:
                    break
                await asyncio.sleep(0.1)
            v2 = await apply(write_bundle(tmp_path / "v2", TICK, extra={"w.bin": os.urandom(60_000)}))

            for _ in range(300):
                rows = await query("SELECT version, state, message FROM deliveries WHERE device_id = 'phone-1'")
                if rows and rows[0][1] == "failed":
                    break
                await asyncio.sleep(0.1)
            ((version, state, message),) = rows
            assert (version, state) == (v2, "failed")
            assert message.startswith("disk budget 100 kB exceeded: default/tick v2 needs 5")
            assert "KiB in use (running versions: default/tick v1)" in message
            status = await adm.get_release_status("default/tick")
            assert (status.version, status.failed, status.installed) == (v2, 1, 0)

            # The previous version keeps working: its interval runs still reach the controller.
            before = await results(v1)
            for _ in range(100):
                if await results(v1) >= before + 2:
                    break
                await asyncio.sleep(0.1)
            assert await results(v1) >= before + 2
            assert device.store.current("default/tick") == v1 and device.store.snapshot().total <= 100_000
            assert await results(v2) == 0
    finally:
        device.stop()
        await asyncio.wait_for(run, timeout=15)
