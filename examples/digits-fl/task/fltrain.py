"""The digits-fl model and its local training step: weights in, weights out, all numpy at the boundary.

A 64-32-10 MLP (fc1: 64 -> 32, ReLU, fc2: 32 -> 10, softmax), its weights a
dict of float32 arrays named as PyTorch names them (`fc1.weight` [32, 64],
`fc1.bias` [32], `fc2.weight` [10, 32], `fc2.bias` [10]): the names and
shapes of the global model's safetensors file.

`train` is the one training function of the example: Tether's task (`task.py`)
calls it on the device, and `tether bench fl` hands the very same function to
Flower's clients, so both systems run identical local maths. It trains with
MNN (`MNN.nn` + `MNN.optim.SGD`), following docs/task-api.md, "Training tasks":
`MNN.expr.lazy_eval(True)` first (without it optimizer steps silently do
nothing), the loss from `MNN.nn.loss` (the public `MNN.expr` wrappers insert
Cast ops with no gradient), and every `Var.read()` copied while the Var lives.
The global weights are written into the module's own parameters
(`Var.write`), which keeps them trainable.

FedProx (Li et al. 2020): with `proximal_mu` > 0 each SGD step also takes the
gradient of (mu/2)·||w - w_global||², i.e. w <- w - lr·mu·(w_before - w_global)
after the optimizer's step on the data loss.

Deterministic: the batch order comes from `seed` alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLASSES = 10
FEATURES = 64
HIDDEN = 32
SHAPES: dict[str, tuple[int, ...]] = {
    "fc1.weight": (HIDDEN, FEATURES),
    "fc1.bias": (HIDDEN,),
    "fc2.weight": (CLASSES, HIDDEN),
    "fc2.bias": (CLASSES,),
}
NAMES = tuple(SHAPES)


def batch_seed(seed: int, round_number: int) -> int:
    """The batch-order seed of a round (numbered from 1, as the controller numbers them)."""
    return seed * 1_000_003 + round_number


def initial_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Glorot-uniform weights and zero biases, float32, from `seed` (the round-0 global model)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in SHAPES.items():
        if len(shape) == 2:
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            out[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, dtype=np.float32)
    return out


def check_weights(weights: dict[str, np.ndarray]) -> None:
    """ValueError naming the tensor when the weights are not this model's."""
    if set(weights) != set(SHAPES):
        raise ValueError(f"weights: expected tensors {sorted(SHAPES)}, got {sorted(weights)}")
    for name, shape in SHAPES.items():
        w = weights[name]
        if tuple(w.shape) != shape or w.dtype != np.float32:
            raise ValueError(f"weights[{name!r}]: expected float32 {list(shape)}, got {w.dtype} {list(w.shape)}")
        if not np.isfinite(w).all():
            raise ValueError(f"weights[{name!r}]: holds NaN or infinite values")


def predict(weights: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Softmax probabilities in numpy (the cloud's evaluation; the same maths as the MNN module)."""
    h = np.maximum(X @ weights["fc1.weight"].T + weights["fc1.bias"], 0.0)
    z = h @ weights["fc2.weight"].T + weights["fc2.bias"]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evaluate(weights: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Cross-entropy loss and accuracy of the weights on (X, y)."""
    probs = predict(weights, X).astype(np.float64)
    p = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return {"loss": float(-np.log(p).mean()), "accuracy": float((probs.argmax(1) == y).mean())}


def _module(MNN: Any) -> Any:
    nn, F = MNN.nn, MNN.expr

    class Net(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.linear(FEATURES, HIDDEN)
            self.fc2 = nn.linear(HIDDEN, CLASSES)

        def forward(self, x: Any) -> Any:
            return F.softmax(self.fc2(F.relu(self.fc1(x))), 1)

    return Net()


def _bind(module: Any) -> list[str]:
    """The weight name of each of the module's parameters (MNN lists them in its own order; shapes are unique)."""
    by_shape = {
        (HIDDEN, FEATURES): "fc1.weight",
        (1, HIDDEN): "fc1.bias",
        (CLASSES, HIDDEN): "fc2.weight",
        (1, CLASSES): "fc2.bias",
    }
    names = [by_shape[tuple(p.shape)] for p in module.parameters]
    if sorted(names) != sorted(NAMES):
        raise RuntimeError(f"unexpected MNN parameters {names}")
    return names


def _read(module: Any, names: list[str]) -> dict[str, np.ndarray]:
    return {
        n: np.array(p.read(), dtype=np.float32, copy=True).reshape(SHAPES[n])
        for n, p in zip(names, module.parameters, strict=True)
    }


def train(
    weights: dict[str, np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    *,
    lr: float = 0.1,
    batch: int = 32,
    epochs: int = 1,
    seed: int = 0,
    proximal_mu: float = 0.0,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """`epochs` of minibatch SGD (no momentum) from `weights` on (X, y): the new weights and local metrics."""
    import MNN

    check_weights(weights)
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if X.ndim != 2 or X.shape[1] != FEATURES or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"data: X {X.shape} and y {y.shape} are not [n, {FEATURES}] and [n] with n >= 1")
    if not (0.0 < lr <= 10.0 and batch >= 1 and epochs >= 1 and proximal_mu >= 0.0):
        raise ValueError(f"hyper-parameters out of range: lr={lr}, batch={batch}, epochs={epochs}, mu={proximal_mu}")
    F = MNN.expr
    F.lazy_eval(True)  # required: without it optimizer steps silently do nothing
    module = _module(MNN)
    names = _bind(module)
    for n, p in zip(names, module.parameters, strict=True):
        p.write(np.ascontiguousarray(weights[n].reshape(tuple(p.shape))))
    before = evaluate(weights, X, y)
    opt = MNN.optim.SGD(module, lr, 0.0, 0.0)
    module.train(True)
    rng = np.random.default_rng(seed)
    n = int(X.shape[0])
    steps = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            xb = F.const(X[idx], [len(idx), FEATURES], F.NCHW, F.float)
            target = F.one_hot(F.const(y[idx].astype(np.int32), [len(idx)], F.NCHW, F.int), CLASSES, 1.0, 0.0)
            if proximal_mu > 0.0:
                pre = _read(module, names)
            opt.step(MNN.nn.loss.cross_entropy(module.forward(xb), target))
            if proximal_mu > 0.0:
                for name, p in zip(names, module.parameters, strict=True):
                    w = np.array(p.read(), dtype=np.float32, copy=True).reshape(SHAPES[name])
                    w -= np.float32(lr * proximal_mu) * (pre[name] - weights[name])
                    p.write(np.ascontiguousarray(w.reshape(tuple(p.shape))))
            steps += 1
    new = _read(module, names)
    after = evaluate(new, X, y)
    metrics = {
        "loss_before": before["loss"],
        "loss_after": after["loss"],
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "steps": float(steps),
    }
    return new, metrics
