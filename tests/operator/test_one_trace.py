"""One OpenTelemetry trace from the operator's reconcile to the Celery aggregation, in one process.

Given the SDK with an in-memory exporter, the operator (Kopf on the emulator), a real controller
(gRPC on loopback, PostgreSQL, the Celery enqueuer on a real broker), an agent and a Celery worker
(an embedded worker thread), when an MLTask is created, then the reconcile, ApplyRelease, the
device's install, pull, run and upload, UploadResult and the aggregation share one trace id: the
context travels in gRPC metadata, in the Notify and in the Celery message's headers.
"""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN, running_controller
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from operator_helpers import mltask, running_operator, wait_for

from tether.agent import daemon
from tether.agent.client import Backoff
from tether.common import manifest, tracing
from tether.common.admin_client import AdminClient
from tether.devtools.emulator import EmulatedCluster
from tether.operator import release_client

pytest.importorskip("tether.controller.server")

COMPONENTS = {
    "operator": {"reconcile"},
    "controller": {"ApplyRelease", "UploadResult"},
    "agent": {"install", "pull", "run", "upload"},
    "worker": {"aggregate"},
}


OFFICIAL = ("grpc-server", "grpc-client", "celery", "psycopg")


@pytest.fixture(params=["tether-spans", "official-instrumentations"])
def exporter(request: pytest.FixtureRequest) -> Any:
    """Tether's own spans alone, then with OTel's gRPC, Celery and psycopg instrumentations on as well."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.use_provider(provider)
    if request.param == "official-instrumentations":
        pytest.importorskip("opentelemetry.instrumentation.grpc")
        assert tracing.instrument(*OFFICIAL) == OFFICIAL
    try:
        yield spans
    finally:
        tracing.use_provider(None)  # and every instrumentation off again
        provider.shutdown()


@pytest.fixture()
def worker_thread(broker_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    from tether.controller import tasks

    monkeypatch.setenv("TETHER_DATABASE_URL", database_url)
    monkeypatch.setattr(tasks.app.conf, "broker_url", broker_url)
    with start_worker(tasks.app, pool="solo", perform_ping_check=False, shutdown_timeout=10) as worker:
        yield worker
    tasks.close_pool()


async def test_one_trace_from_reconcile_to_aggregate(
    exporter: Any,
    cluster: EmulatedCluster,
    controller_config: Any,
    broker_url: str,
    worker_thread: Any,
    tmp_path: pathlib.Path,
) -> None:
    from tether.controller.enqueue import CeleryEnqueuer

    async with running_controller(controller_config, enqueuer=CeleryEnqueuer(broker_url)) as controller:
        agent = daemon.Agent(
            controller=controller.address,
            state_dir=tmp_path / "device",
            data_dir=tmp_path,
            bootstrap_token=BOOTSTRAP_TOKEN,
            device_id="traced-1",
            attributes={"os": "android"},
            backoff=Backoff(initial_s=0.05, max_s=0.5),
        )
        running = asyncio.create_task(agent.run())
        try:
            await asyncio.wait_for(agent.synced.wait(), 30)
            root = tmp_path / "task"
            root.mkdir()
            (root / "task.py").write_text("def run(ctx):\n    return {'sample_count': 3, 'metrics': {'loss': 0.5}}\n")
            bundle = manifest.hash_directory(root, name="traced", entrypoint="task.py")
            async with AdminClient(target=controller.address, token=ADMIN_TOKEN) as admin:
                await admin.upload_bundle(root, bundle)
                task = mltask("traced")
                task["spec"]["bundle"]["digest"] = bundle.digest
                async with running_operator(cluster, lambda: release_client.connect(controller.address, ADMIN_TOKEN)):
                    await cluster.create(task)

                    async def aggregated() -> Any:
                        names = {s.name for s in exporter.get_finished_spans()}
                        return "aggregate" in names and "UploadResult" in names

                    await wait_for(aggregated, timeout=60, what="the aggregation's span")
                status = await admin.get_release_status("default/traced")
                assert status.aggregate is not None and status.aggregate["results"] == 1
        finally:
            agent.stop()
            await asyncio.gather(running, return_exceptions=True)

    spans = exporter.get_finished_spans()
    applied = next(s for s in spans if s.name == "ApplyRelease")
    trace_id = applied.context.trace_id
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    names = {s.name.split(" ")[0] for s in in_trace}  # "reconcile change" / "reconcile poll": whichever applied
    for component, expected in COMPONENTS.items():
        assert expected <= names, f"{component}: {expected - names} not in the release's trace ({sorted(names)})"
    ours = {n for names_ in COMPONENTS.values() for n in names_}
    by_name = {s.name.split(" ")[0]: s for s in in_trace if s.name.split(" ")[0] in ours}
    assert len(by_name) == 8  # each of Tether's steps: reconcile, ApplyRelease, 4 on the device, 2 after
    by_id = {s.context.span_id: s for s in in_trace}

    def parent(span: Any) -> Any:
        return by_id[span.parent.span_id] if span.parent is not None else None

    def tether_parent(span: Any) -> Any:
        """The nearest ancestor that is one of Tether's own spans (skipping the instrumentations')."""
        up = parent(span)
        while up is not None and up.name.split(" ")[0] not in ours:
            up = parent(up)
        return up

    # The parent chain crosses the process boundaries the way the context travelled.
    for child, expected in [
        ("ApplyRelease", "reconcile"),
        ("pull", "install"),
        ("UploadResult", "upload"),
        ("aggregate", "UploadResult"),
        ("install", "ApplyRelease"),  # via the Notify
        ("run", "ApplyRelease"),
    ]:
        assert tether_parent(by_name[child]) is by_name[expected], f"{child}'s parent is not {expected}"
    assert by_name["reconcile"].parent is None  # the trace starts at the operator
    if tracing.instrumented("grpc-server"):  # the official spans sit between Tether's, as the calls went
        assert len(in_trace) > 8
        server = parent(by_name["ApplyRelease"])
        assert server.name == "/tether.v1.AdminService/ApplyRelease" and server.attributes["rpc.system"] == "grpc"
        assert parent(server).name == "/tether.v1.AdminService/ApplyRelease"  # the operator's client span
        assert parent(parent(server)) is by_name["reconcile"]
        assert parent(by_name["UploadResult"]).name == "/tether.v1.DeviceService/UploadResult"
        run = parent(by_name["aggregate"])
        assert run.name == "run/tether.aggregate" and parent(run).name == "apply_async/tether.aggregate"
        statements = [s for s in in_trace if s.attributes.get("db.system") in ("postgresql", "postgres")]
        assert any(tether_parent(s) is by_name["UploadResult"] for s in statements)  # the controller's writes
        assert any(tether_parent(s) is by_name["aggregate"] for s in statements)  # the worker's fold
    else:
        assert len(in_trace) == 8
        assert parent(by_name["ApplyRelease"]) is by_name["reconcile"]
        assert parent(by_name["aggregate"]) is by_name["UploadResult"]
    print(f"one trace {trace_id:032x}: {len(in_trace)} spans, {sorted({s.name for s in in_trace})}")
