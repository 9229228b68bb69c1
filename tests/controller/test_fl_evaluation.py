"""Server-side evaluation: each published round's global model scored on the held-out set the task ships (Postgres).

Given a release whose bundle holds a held-out .npz and an ONNX graph of the model (initializers named as the
model's tensors), when the worker aggregates a round, then the round is recorded with the accuracy and loss of
the *new* model on the held-out set, and the status document, `tether fl history` and stopOn follow it; when
the files are missing or do not fit (shapes, arrays), the round is still published and carries an error naming
the file or tensor, never a stuck round.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io

import grpc
import numpy as np
import psycopg
import pytest
from controller_helpers import enroll
from onnx import TensorProto, helper, numpy_helper

from tether.cli import fl_cmd
from tether.common import admin_client, manifest, tensorfiles
from tether.controller import blobs, round_tasks
from tether.controller.fl import rounds, status
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc
from tether.spec import federation

TASK = "ml/scored"
ADMIN = "admin-token-for-tests"
# A 3-feature, 2-class linear model; the round's update moves w so that class = (x0 > x1).
MODEL = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
DELTA = {"w": np.array([[-1, 1], [1, -1], [0, 0]], dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
X = np.array([[1, 0, 5], [0, 1, 5], [2, 0, 0], [0, 3, 0]], dtype=np.float32)
Y = np.array([1, 0, 1, 0], dtype=np.int64)  # what the new model predicts for all four rows


def graph(*, w_shape: tuple[int, int] = (3, 2)) -> bytes:
    nodes = [
        helper.make_node("Gemm", ["X", "w", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p"], axis=1),
    ]
    g = helper.make_graph(
        nodes,
        "linear",
        inputs=[helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", w_shape[0]])],
        outputs=[helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 2])],
        initializer=[
            numpy_helper.from_array(np.zeros(w_shape, np.float32), name="w"),
            numpy_helper.from_array(np.zeros(2, np.float32), name="b"),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


async def push(address: str, device: str, data: bytes, samples: int) -> pb.PushUpdateResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.DeviceServiceStub(ch)
        creds = await enroll(stub, device)
        header = pb.UpdateHeader(
            release=TASK,
            round=1,
            version=1,
            sample_count=samples,
            encoding="float32",
            size=len(data),
            sha256="sha256:" + hashlib.sha256(data).hexdigest(),
        )
        return await stub.PushUpdate(iter([pb.PushUpdateChunk(header=header, data=data)]), metadata=creds)


async def run_round(start, controller_config, tmp_path, database_url, *, files: dict[str, bytes], server: dict):
    """One round of one update (DELTA) over a bundle holding `files`; the round's stored result and rules."""
    federated = {
        "rounds": 3,
        "stopOn": {"metric": "accuracy", "target": 0.99},
        "participants": {"count": 1},
        "roundDeadlineSeconds": 3600,
        "evaluation": {"metric": "accuracy", "server": server},
    }
    ctl = await start(controller_config)
    root = tmp_path / "task"
    (root / "cloud").mkdir(parents=True)
    (root / "task.py").write_text("def run(ctx):\n    return {'sample_count': 1}\n")
    model_bytes = tensorfiles.dump(MODEL)
    (root / "model.safetensors").write_bytes(model_bytes)
    for path, data in files.items():
        (root / path).write_bytes(data)
    body = manifest.hash_directory(root, name="scored", entrypoint="task.py")
    async with admin_client.AdminClient(ctl.address, token=ADMIN) as admin:
        upload = await admin.upload_bundle(root, body)
        await admin.apply_release(
            release=TASK, manifest_digest=upload.digest, trigger={"type": "onDemand"}, federated=federated
        )
    rules = federation.parse_federation(federated)
    assert rules is not None
    r = dataclasses.replace(
        rounds.open_round(task=TASK, number=1, rules=rules, now=0.0),
        model=manifest.sha256_digest(model_bytes),
        version=1,
    )
    await ctl.storage.rounds.create_round(r)
    await ctl.storage.rounds.update_round(
        rounds.select(r, eligible=["dev-a"], rules=rules, now=1e12), expected=rounds.Phase.OPEN
    )
    update = tensorfiles.encode_update(DELTA, encoding="float32")
    assert (await push(ctl.address, "dev-a", update, samples=4)).accepted
    store = blobs.FilesystemBlobStore(controller_config.blob_dir)

    def aggregate() -> str:
        with psycopg.connect(database_url) as conn:
            return round_tasks.aggregate_round(conn, store, task=TASK, number=1)

    assert await asyncio.to_thread(aggregate) == "published"
    stored = await ctl.storage.rounds.round(task=TASK, number=1)
    assert stored is not None and stored.phase is rounds.Phase.PUBLISHED  # scored or not, the round completes
    result = await ctl.storage.rounds.round_result(task=TASK, number=1)
    assert result is not None
    return ctl, stored, result, rules


async def test_each_round_is_scored_on_the_held_out_set_and_the_score_drives_status_history_and_stop_on(
    start, controller_config, tmp_path, database_url
) -> None:
    files = {"cloud/heldout.npz": npz(X=X, y=Y), "cloud/model.onnx": graph()}
    server = {"file": "cloud/heldout.npz", "model": "cloud/model.onnx"}
    _, stored, result, rules = await run_round(
        start, controller_config, tmp_path, database_url, files=files, server=server
    )
    assert result.evaluation_error == ""
    assert result.evaluation is not None and set(result.evaluation) == {"accuracy", "loss"}
    assert result.evaluation["accuracy"] == 1.0  # the *new* model: the round-0 model (zeros) scores 0.5
    logits = X.astype(np.float64) @ DELTA["w"].astype(np.float64)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert result.evaluation["loss"] == pytest.approx(-np.log(p[np.arange(4), Y]).mean(), rel=1e-5)
    assert rounds.followed_metric(result, rules=rules) == 1.0
    assert rounds.should_stop(rounds_published=1, history=[1.0], rules=rules) is rounds.StopReason.TARGET
    doc = status.document([stored], {1: result}, rules=rules)
    assert doc["history"][0]["evaluation"] == result.evaluation and doc["history"][0]["value"] == 1.0
    header, rows = fl_cmd.history_table(doc)
    assert rows[0][header.index("server_accuracy")] == "1" and "evaluation_error" not in header


@pytest.mark.parametrize(
    ("files", "server", "words"),
    [
        (
            {"cloud/model.onnx": graph()},
            {"file": "cloud/missing.npz", "model": "cloud/model.onnx"},
            "federated.evaluation.server.file: 'cloud/missing.npz' is not a file of bundle scored",
        ),
        (
            {"cloud/heldout.npz": npz(X=X, y=Y), "cloud/model.onnx": graph(w_shape=(4, 2))},
            {"file": "cloud/heldout.npz", "model": "cloud/model.onnx"},
            "initializer 'w' has shape [4, 2], the model's tensor [3, 2]",
        ),
        (
            {"cloud/heldout.npz": npz(X=X), "cloud/model.onnx": graph()},
            {"file": "cloud/heldout.npz", "model": "cloud/model.onnx"},
            "'cloud/heldout.npz': has no array 'y'",
        ),
        (
            {"cloud/heldout.npz": npz(X=X[:, :2], y=Y), "cloud/model.onnx": graph()},
            {"file": "cloud/heldout.npz", "model": "cloud/model.onnx"},
            "running the held-out X (shape [4, 2]) failed",
        ),
        (
            {"cloud/heldout.npz": npz(X=X, y=Y), "cloud/model.onnx": b"not onnx"},
            {"file": "cloud/heldout.npz", "model": "cloud/model.onnx"},
            "federated.evaluation.server.model 'cloud/model.onnx': not an ONNX model",
        ),
    ],
)
async def test_a_bad_held_out_set_or_graph_is_an_error_on_the_published_round(
    start, controller_config, tmp_path, database_url, files, server, words
) -> None:
    _, stored, result, rules = await run_round(
        start, controller_config, tmp_path, database_url, files=files, server=server
    )
    assert words in result.evaluation_error, result.evaluation_error
    assert result.evaluation is None and rounds.followed_metric(result, rules=rules) is None
    doc = status.document([stored], {1: result}, rules=rules)
    assert words in doc["evaluationError"]
    header, rows = fl_cmd.history_table(doc)
    assert words in rows[0][header.index("evaluation_error")]
