"""Backend selection in the daemon: before install, reported to the controller, used by the worker;
a model that loads nowhere refuses the version with a clear message and the agent carries on."""

from __future__ import annotations

import asyncio
import random
import shutil

import grpc
import pytest
from agent_fakes import BOOTSTRAP, FakeController, wait_until

from tether.agent import backends, client, daemon
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc


class BackendsFake(FakeController):
    def __init__(self) -> None:
        super().__init__()
        self.backend_reports: list[pb.ReportBackendsRequest] = []

    async def ReportBackends(self, request, context):
        await self._device(context)
        self.backend_reports.append(request)
        return pb.ReportBackendsResponse()


@pytest.fixture()
async def fake():
    server = grpc.aio.server()
    ctl = BackendsFake()
    pb_grpc.add_DeviceServiceServicer_to_server(ctl, server)
    ctl.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    yield ctl
    await server.stop(0)


def make_agent(fake, tmp_path, data_dir) -> daemon.Agent:
    return daemon.Agent(
        controller=fake.address,
        state_dir=tmp_path / "state",
        data_dir=data_dir,
        bootstrap_token=BOOTSTRAP,
        device_id="dev-sel",
        backends=["mnn/cpu", "onnxruntime/cpu"],
        backoff=client.Backoff(initial_s=0.02, max_s=0.2),
        rng=random.Random(0),
    )


async def test_bad_model_is_refused_with_a_clear_error_and_the_agent_keeps_going(
    fake, tmp_path, digits_dir, data_dir
) -> None:
    bad = tmp_path / "bad-bundle"
    shutil.copytree(digits_dir, bad)
    (bad / "model.mnn").write_bytes(b"\x00garbage" * 64)
    (bad / "model.onnx").write_bytes(b"\x00garbage" * 64)
    bad_rel = fake.publish("ns/bad", bad)
    good_rel = fake.publish("ns/good", digits_dir)

    agent = make_agent(fake, tmp_path, data_dir)
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: "REFUSED" in fake.states(bad_rel.name) and "SUCCEEDED" in fake.states(good_rel.name))
        await wait_until(lambda: bool(fake.backend_reports))
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=15)

    (message,) = [m for _, r, _, s, m in fake.statuses if r == bad_rel.name and s == "REFUSED"]
    assert "model 'model.mnn' does not run on this device" in message and "MNN cannot load model" in message
    assert fake.states(bad_rel.name, progress=False) == ["REFUSED"]  # never installed, never run
    assert agent.store.current(bad_rel.name) is None and bad_rel.name not in agent.state.installed

    # The good model: selected before install, run on the choice, the choice reported upstream.
    choices = agent.selector.cache.entries()
    assert len(choices) == 1
    (record,) = agent.state.runs.values()
    assert record.status == "uploaded" and record.message == choices[0].chosen.backend_name
    report = fake.backend_reports[-1]
    (choice,) = report.choices
    assert choice.candidate == choices[0].chosen.key and choice.latency_ms == pytest.approx(choices[0].latency_ms)
    assert choice.release == good_rel.name and choice.model == "model.mnn"
    assert report.fingerprint.startswith("sha256:") and "mnn/cpu" in report.backends
    assert (tmp_path / "state" / backends.CACHE_FILE).is_file()


async def test_a_converted_model_that_disagrees_with_its_source_is_not_selected_and_reported(
    fake, tmp_path, data_dir
) -> None:
    import pathlib

    from test_model_inputs import corrupt

    models = pathlib.Path(__file__).resolve().parents[2] / "bench" / "models"
    bundle = tmp_path / "encoder-bundle"
    bundle.mkdir()
    shutil.copyfile(models / "encoder.onnx", bundle / "model.onnx")
    corrupt(models / "encoder.mnn", bundle / "model.mnn")
    (bundle / "task.py").write_text(
        "import numpy as np\n\n"
        "def run(ctx):\n"
        "    ids = np.arange(32, dtype=np.int64).reshape(1, 32) + 100\n"
        "    out = ctx.model.run({'input_ids': ids, 'attention_mask': np.ones((1, 32), np.int64)})\n"
        "    return {'sample_count': 1, 'metrics': {'logit0': float(out['logits'][0, 0])}}\n"
    )
    (bundle / "bundle.yaml").write_text(
        "name: encoder\nentrypoint: task.py\nengines:\n  - engine: mnn\n    model: model.mnn\n"
        "    inputs: {input_ids: [1, 32], attention_mask: [1, 32]}\n"
    )
    rel = fake.publish("ns/encoder", bundle)
    agent = make_agent(fake, tmp_path, data_dir)
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: "SUCCEEDED" in fake.states(rel.name))
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=15)
    (installed,) = [m for _, r, _, s, m in fake.statuses if r == rel.name and s == "INSTALLED"]
    assert installed.startswith("model.mnn: MNN not selected, disagrees with model.onnx") and "onnxruntime" in installed
    (record,) = agent.state.runs.values()
    assert record.status == "uploaded" and record.message == "onnxruntime/cpu"  # the source ran, not the bad copy
