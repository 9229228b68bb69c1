"""digits-train: fine-tune the digits MLP on the device's local data with MNN, upload a model update.

Runs on the device inside Tether's task worker (a child process: `MNN.nn`
holds the GIL while it trains, which is fine there). Imports numpy and MNN
(both come with the agent).

What it does:
1. Loads `model.mnn` (the same model `digits-eval` serves, so it is one shared
   blob on the device) as a trainable `MNN.nn` module: `MNN.expr.load_as_dict`
   then `MNN.nn.load_module(inputs, outputs, True)`, which turns the
   converter's fused convolutions back into layers with trainable weights.
   (`MNN.nn.load_module_from_file(..., for_training=True)` silently ignores
   `for_training`: its module has no parameters.)
2. `MNN.expr.lazy_eval(True)` first: without it optimizer steps do nothing.
3. Trains a few epochs with SGD (momentum) or Adam on `<data_dir>/digits.npz`,
   loss `MNN.nn.loss.cross_entropy` on the softmax output. The public
   `MNN.expr` wrappers (`log`, `negative`, ...) insert Cast ops that have no
   gradient, so a hand-written loss from them also silently trains nothing.
   `Var.read()` returns a view of the Var's buffer: copy it while the Var lives.
4. Returns the update: per parameter `delta/<i> = new - old` (float64 on the
   wire), `sample_count` = local samples, and the loss before and after.

Aggregated with `tensors: weightedMean`, the controller computes
sum_k n_k * delta_k / sum_k n_k, the FedAvg update; the next model is
old + that mean (docs/task-api.md, "Training tasks").

Hyper-parameters come from the trigger payload (`tether` on-demand runs) or
the defaults below: {"epochs": 3, "lr": 0.05, "optimizer": "sgd"|"adam", "batch": 32}.
"""

from __future__ import annotations

import os

import numpy as np

CLASSES = 10
DEFAULTS = {"epochs": 3, "lr": 0.05, "optimizer": "sgd", "batch": 32, "seed": 0}


def _hyper(ctx) -> dict:
    payload = (getattr(ctx, "inputs", None) or {}).get("payload") or {}
    h = dict(DEFAULTS)
    h.update({k: payload[k] for k in DEFAULTS if k in payload})
    if not (1 <= int(h["epochs"]) <= 50 and 0 < float(h["lr"]) <= 1 and 1 <= int(h["batch"]) <= 1024):
        raise ValueError(f"hyper-parameters out of range: {h}")
    if h["optimizer"] not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be sgd or adam, got {h['optimizer']!r}")
    return h


def load_trainable(path: str):
    """The model as a trainable MNN.nn module (and the MNN module itself)."""
    import MNN

    MNN.expr.lazy_eval(True)  # required: without it optimizer steps silently do nothing
    variables = MNN.expr.load_as_dict(path)
    module = MNN.nn.load_module([variables["input"]], [variables["probs"]], True)
    return module, MNN


def mean_loss(module, MNN, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Cross-entropy and accuracy over (X, y) in eval mode."""
    F = MNN.expr
    module.train(False)
    out = module.forward(F.const(X, list(X.shape), F.NCHW, F.float))
    # read() is a view into the Var's buffer: copy it while `out` is still alive.
    probs = np.array(out.read(), dtype=np.float64, copy=True)
    del out
    module.train(True)
    p = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.log(p).mean()), float((probs.argmax(1) == y).mean())


def run(ctx):
    h = _hyper(ctx)
    data = np.load(os.path.join(ctx.data_dir, "digits.npz"), allow_pickle=False)
    X = np.ascontiguousarray(data["X"], dtype=np.float32)
    y = np.asarray(data["y"], dtype=np.int64)
    if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"digits.npz: X {X.shape} and y {y.shape} do not match")
    n = int(X.shape[0])

    module, MNN = load_trainable(os.path.join(ctx.bundle_dir, "model.mnn"))
    F = MNN.expr
    params = module.parameters
    if not params:
        raise RuntimeError("the model has no trainable parameters")
    before = [np.array(p.read(), dtype=np.float64, copy=True) for p in params]
    loss_before, acc_before = mean_loss(module, MNN, X, y)

    lr, batch = float(h["lr"]), int(h["batch"])
    opt = (
        MNN.optim.SGD(module, lr, 0.9, 0.0) if h["optimizer"] == "sgd" else MNN.optim.ADAM(module, lr, 0.9, 0.999, 0.0)
    )
    rng = np.random.default_rng(int(h["seed"]) + int(ctx.state.get("rounds", 0)))
    module.train(True)
    steps = 0
    for _ in range(int(h["epochs"])):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            xb = F.const(X[idx], [len(idx), X.shape[1]], F.NCHW, F.float)
            target = F.one_hot(F.const(y[idx].astype(np.int32), [len(idx)], F.NCHW, F.int), CLASSES, 1.0, 0.0)
            loss = MNN.nn.loss.cross_entropy(module.forward(xb), target)
            opt.step(loss)
            steps += 1

    after = [np.array(p.read(), dtype=np.float64, copy=True) for p in module.parameters]
    loss_after, acc_after = mean_loss(module, MNN, X, y)
    ctx.state["rounds"] = int(ctx.state.get("rounds", 0)) + 1
    ctx.log(f"trained {steps} steps on {n} samples: loss {loss_before:.4f} -> {loss_after:.4f}")
    return {
        "sample_count": n,
        "metrics": {
            "loss_before": loss_before,
            "loss_after": loss_after,
            "accuracy_before": acc_before,
            "accuracy_after": acc_after,
        },
        "tensors": {f"delta/{i}": a - b for i, (a, b) in enumerate(zip(after, before, strict=True))},
        "counts": {"steps": steps, "samples": n},
    }
