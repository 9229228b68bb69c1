"""Defect class 2 (issue 14): every identifier derived from the longest names Kubernetes allows is delivered.

A namespace of 63 characters and an MLTask name of 253 make the release
`<63>/<253>` (317 characters). Before the fix such a release passed the
operator and then: its rollout document's salt (the release name) overran the
shared grammar's 256 characters (the controller refused every apply), the
agent ignored the desired task (its own release limit was 253), its install
and task-state file names overran the filesystem's 255 bytes (an endless
retry), and the upload's idempotency key (device id + release + version +
run) overran the controller's 128 characters (refused after the run). Now the
limits live in `tether.spec.names` and agree, and a name that cannot be
delivered is refused when the MLTask is applied.
"""

from __future__ import annotations

import asyncio
import datetime
import pathlib
import random

import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN

from tether.agent import bundles, client, daemon
from tether.common import admin_client, bundle_files, errors
from tether.operator import conditions, reconcile, release_client
from tether.operator.task_status import MLTaskStatus
from tether.spec import names

NAMESPACE = "n" * 62 + "s"  # 63: the longest DNS label
NAME = ("m" * 62 + ".") * 3 + "l" * 64  # 253: the longest DNS subdomain
DEVICE = "d" * names.MAX_DEVICE_ID_LEN  # the longest device id the controller enrols
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
TASK = "def run(ctx):\n    ctx.state['runs'] = ctx.state.get('runs', 0) + 1\n    return {'sample_count': 1}\n"


def _spec(digest: str) -> dict:
    return {
        "bundle": {"digest": digest},
        "trigger": {"type": "onInstall"},
        "rollout": {"stages": [{"percent": 50}, {"percent": 100}]},
    }


async def until(predicate, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_the_longest_legal_names_are_delivered_end_to_end(controller, tmp_path):
    assert len(NAMESPACE) == 63 and len(NAME) == 253
    release = f"{NAMESPACE}/{NAME}"
    directory = tmp_path / "bundle"
    directory.mkdir()
    (directory / "task.py").write_text(TASK)
    (directory / "bundle.yaml").write_text("name: t\nentrypoint: task.py\n")
    bundle = bundle_files.build_manifest(directory)
    agent = daemon.Agent(
        controller=controller.address,
        state_dir=tmp_path / "state",
        data_dir=tmp_path / "data",
        bootstrap_token=BOOTSTRAP_TOKEN,
        device_id=DEVICE,
        backends=["mnn/cpu"],
        backoff=client.Backoff(initial_s=0.05, max_s=0.3),
        rng=random.Random(0),
        backend_selection=False,
    )
    running = asyncio.create_task(agent.run())
    try:
        async with admin_client.AdminClient(target=controller.address, token=ADMIN_TOKEN) as adm:
            await adm.upload_bundle(directory, bundle)
            # The operator's own decision, applied as its handler applies it.
            meta = reconcile.Meta(name=NAME, namespace=NAMESPACE, generation=1)
            decision = reconcile.decide(
                spec=_spec(bundle.digest), meta=meta, status=MLTaskStatus(), observed=None, now=NOW
            )
            (apply,) = [a for a in decision.actions if isinstance(a, reconcile.ApplyRelease)]
            assert apply.release == release and apply.rollout is not None and apply.rollout.salt == release
            await release_client.ControllerAdmin(adm).apply(apply)

            async def uploaded() -> bool:
                status = await adm.get_release_status(release)
                return status.succeeded >= 1 and status.results >= 1

            await until(uploaded)
    finally:
        agent.stop()
        await running
    (record,) = agent.state.runs.values()
    assert record.status == "uploaded"
    assert len(record.key) <= names.MAX_IDEMPOTENCY_KEY_LEN
    assert agent.store.releases() == [release]
    assert agent.store.load_task_state(release) == {"runs": 1}
    for path in (tmp_path / "state").rglob("*"):
        assert len(path.name.encode()) <= 255


def test_names_kubernetes_would_not_allow_are_refused_at_apply_time():
    meta = reconcile.Meta(name="x" * 254, namespace="default", generation=1)
    decision = reconcile.decide(
        spec=_spec("sha256:" + "a" * 64), meta=meta, status=MLTaskStatus(), observed=None, now=NOW
    )
    assert decision.actions == ()
    (valid,) = [c for c in decision.status.conditions if c.type == conditions.VALID]
    assert valid.reason == "InvalidSpec" and valid.message.startswith("metadata.name:")


def test_agent_file_names_and_keys_fit_their_limits_for_any_legal_name(tmp_path):
    store = bundles.BundleStore(tmp_path)
    release = f"{NAMESPACE}/{NAME}"
    assert len(bundles.release_dirname(release)) <= names.MAX_FILE_NAME
    assert bundles.release_dirname("ns/short") == "ns%2Fshort"  # what older agents wrote stays
    assert bundles.release_dirname(release) != bundles.release_dirname(release[:-1] + "k")
    key = names.idempotency_key(device_id=DEVICE, release=release, version=2**53, suffix="demand-" + "r" * 64)
    assert len(key) <= names.MAX_IDEMPOTENCY_KEY_LEN
    assert len(store.result_path(key).name) <= 255 and len(store.result_path(":" * 128).name) <= 255
    with pytest.raises(errors.InvalidArgument):
        bundles.release_dirname("x" * (names.MAX_RELEASE_LEN + 1))


def test_the_shared_grammar_takes_the_operators_salt_for_the_longest_release():
    from tether.spec import staging

    doc = {"version": 1, "salt": f"{NAMESPACE}/{NAME}", "stage": 0, "action": "progress", "stages": [{"percent": 100}]}
    assert staging.parse_rollout(doc).salt == doc["salt"]


def test_the_controller_takes_the_longest_release_name():
    from tether.controller import releases

    assert releases.check_release_name(f"{NAMESPACE}/{NAME}") == f"{NAMESPACE}/{NAME}"
    assert pathlib.PurePosixPath(NAME).name == NAME


def test_a_percent_stage_that_rounds_up_to_everyone_reaches_everyone():
    from tether.controller import cohorts

    assert cohorts.threshold([0.3], percent=50) == 1.0  # was an IndexError: the controller refused the apply
    assert cohorts.threshold([0.1 * i for i in range(10)], percent=95) == 1.0
    assert cohorts.threshold([0.1, 0.5, 0.9], percent=50) == 0.9
