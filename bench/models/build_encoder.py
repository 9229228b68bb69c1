"""Build the runtime benchmark's transformer encoder (build-time only: needs `onnx`; outputs are committed).

A small BERT-style encoder with integer inputs, written with the `onnx`
helper API (no torch): `input_ids` int64 [1, 32] (vocabulary of 1000) and
`attention_mask` int64 [1, 32] -> token and position embeddings, 2 encoder
layers (4 heads of 16, hidden 64, feed-forward 128 with exact GELU,
post-LayerNorm, the mask as an additive -10000 bias on the attention scores),
mean pooling over the unmasked tokens, a 4-way classifier. Outputs `logits`
[1, 4] and `last_hidden_state` [1, 32, 64]. Weights are drawn from a fixed
seed (N(0, 0.02), as BERT initialises), so rebuilds are byte-identical; the
model is untrained: it exists to measure engines and to catch wrong
conversions, and its outputs depend on every id and on the mask.

Writes `encoder.onnx`, its MNN conversion `encoder.mnn` (MNN's
`_tools.mnnconvert` entry point through `tether.agent.convert`, verified
against ONNX Runtime on realistic inputs), `encoder.inputs.npz` (four
representative sample inputs: ids within the vocabulary, masks with padding;
the sample-input format of docs/task-api.md) and the `encoder` entry of
`models.json`.

Usage: python bench/models/build_encoder.py
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NAME = "encoder"
VOCAB, SEQ, HIDDEN, HEADS, FFN, LAYERS, CLASSES = 1000, 32, 64, 4, 128, 2, 4
SEED = 0


def build_onnx(path: pathlib.Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, shape: tuple[int, ...], *, std: float = 0.02) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name))
        return name

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def layer_norm(x: str, prefix: str) -> str:
        gamma = const(f"{prefix}.gamma", np.ones(HIDDEN, np.float32))
        beta = const(f"{prefix}.beta", np.zeros(HIDDEN, np.float32))
        return node("LayerNormalization", [x, gamma, beta], f"{prefix}.out", axis=-1, epsilon=1e-5)

    def dense(x: str, prefix: str, n_in: int, n_out: int) -> str:
        mm = node("MatMul", [x, weight(f"{prefix}.w", (n_in, n_out))], f"{prefix}.mm")
        return node("Add", [mm, const(f"{prefix}.b", np.zeros(n_out, np.float32))], f"{prefix}.out")

    head = HIDDEN // HEADS
    const("shape.heads", np.array([1, SEQ, HEADS, head], np.int64))
    const("shape.hidden", np.array([1, SEQ, HIDDEN], np.int64))
    const("axes.1", np.array([1], np.int64))
    const("axes.1_2", np.array([1, 2], np.int64))
    const("axes.2", np.array([2], np.int64))
    const("one", np.array(1.0, np.float32))
    const("neg", np.array(-10000.0, np.float32))
    const("scale", np.array(1.0 / np.sqrt(head), np.float32))
    const("half", np.array(0.5, np.float32))
    const("rsqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))

    tok = node("Gather", [weight("embed.tokens", (VOCAB, HIDDEN)), "input_ids"], "embed.tok", axis=0)
    x = node("Add", [tok, weight("embed.positions", (1, SEQ, HIDDEN))], "embed.sum")
    x = layer_norm(x, "embed.ln")
    maskf = node("Cast", ["attention_mask"], "mask.f", to=TensorProto.FLOAT)
    keep = node("Unsqueeze", [maskf, "axes.1_2"], "mask.4d")  # [1, 1, 1, S]
    bias = node("Mul", [node("Sub", ["one", keep], "mask.inv"), "neg"], "mask.bias")
    for i in range(LAYERS):
        p = f"l{i}"
        q = node("Transpose", [node("Reshape", [dense(x, f"{p}.q", HIDDEN, HIDDEN), "shape.heads"], f"{p}.qr")],
                 f"{p}.qt", perm=[0, 2, 1, 3])  # fmt: skip
        k = node("Transpose", [node("Reshape", [dense(x, f"{p}.k", HIDDEN, HIDDEN), "shape.heads"], f"{p}.kr")],
                 f"{p}.kt", perm=[0, 2, 3, 1])  # fmt: skip
        v = node("Transpose", [node("Reshape", [dense(x, f"{p}.v", HIDDEN, HIDDEN), "shape.heads"], f"{p}.vr")],
                 f"{p}.vt", perm=[0, 2, 1, 3])  # fmt: skip
        scores = node("Add", [node("Mul", [node("MatMul", [q, k], f"{p}.qk"), "scale"], f"{p}.scaled"), bias],
                      f"{p}.scores")  # fmt: skip
        probs = node("Softmax", [scores], f"{p}.probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], f"{p}.ctx")], f"{p}.ctxt", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "shape.hidden"], f"{p}.ctxr")
        x = layer_norm(node("Add", [x, dense(ctx, f"{p}.o", HIDDEN, HIDDEN)], f"{p}.res1"), f"{p}.ln1")
        h = dense(x, f"{p}.ff1", HIDDEN, FFN)
        erf = node("Erf", [node("Mul", [h, "rsqrt2"], f"{p}.gelu.s")], f"{p}.gelu.erf")
        gelu = node("Mul", [node("Mul", [h, "half"], f"{p}.gelu.h"), node("Add", [erf, "one"], f"{p}.gelu.e1")],
                    f"{p}.gelu")  # fmt: skip
        x = layer_norm(node("Add", [x, dense(gelu, f"{p}.ff2", FFN, HIDDEN)], f"{p}.res2"), f"{p}.ln2")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state"))
    mask3 = node("Unsqueeze", [maskf, "axes.2"], "mask.3d")  # [1, S, 1]
    summed = node("ReduceSum", [node("Mul", [x, mask3], "pool.masked"), "axes.1"], "pool.sum", keepdims=0)
    count = node("ReduceSum", [maskf, "axes.1"], "pool.count", keepdims=1)  # [1, 1]
    pooled = node("Div", [summed, node("Max", [count, "one"], "pool.count1")], "pool.mean")
    logits = dense(pooled, "classifier", HIDDEN, CLASSES)
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    graph = helper.make_graph(
        nodes,
        "tether-bench-encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, SEQ]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, SEQ]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES]),
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [1, SEQ, HIDDEN]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tether")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())


def sample_inputs() -> dict[str, np.ndarray]:
    """Four representative inputs, stacked on a leading sample axis: varied lengths, padding at the end."""
    rng = np.random.default_rng(SEED + 1)
    ids = np.zeros((4, 1, SEQ), np.int64)
    mask = np.zeros((4, 1, SEQ), np.int64)
    for i, length in enumerate((SEQ, 24, 9, 17)):
        ids[i, 0, 0] = 101 % VOCAB  # a [CLS]-like first token
        ids[i, 0, 1:length] = rng.integers(1, VOCAB, size=length - 1)
        mask[i, 0, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _sha256(path: pathlib.Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    for root in ("agent", "common", "protos"):
        sys.path.insert(0, str(ROOT / root))
    from tether.agent import convert

    onnx_path, mnn_path, samples_path = HERE / f"{NAME}.onnx", HERE / f"{NAME}.mnn", HERE / f"{NAME}.inputs.npz"
    build_onnx(onnx_path)
    with samples_path.open("wb") as f:
        np.savez(f, **sample_inputs())  # type: ignore[arg-type]
    result = convert.convert(onnx_path, mnn_path, samples=samples_path)
    index_path = HERE / "models.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index[NAME] = {
        "inputs": {"input_ids": [1, SEQ], "attention_mask": [1, SEQ]},
        "source": f"transformer encoder built with the onnx helper API (vocab {VOCAB}, {LAYERS} layers, "
        f"hidden {HIDDEN}, {HEADS} heads, seed {SEED}; untrained)",
        "onnx": {"file": onnx_path.name, "size": onnx_path.stat().st_size, "sha256": _sha256(onnx_path)},
        "mnn": {"file": mnn_path.name, "size": result.size, "sha256": result.sha256},
        "samples": {"file": samples_path.name, "sha256": _sha256(samples_path)},
        "mnn_max_abs_diff": result.max_abs_diff,
    }
    index_path.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    print(f"{NAME}: onnx {onnx_path.stat().st_size} B, mnn {result.size} B, max |mnn - ort| {result.max_abs_diff:.2e}")


if __name__ == "__main__":
    main()
