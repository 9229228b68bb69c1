"""digits-eval: evaluate the digits MLP on the device's local data.

Runs on the device inside Tether's task worker. Imports only numpy; the model
is loaded by the agent (`ctx.model`) on the backend it selected.

Local data: `<data_dir>/digits.npz` with X (float32 [n, 64], pixels scaled to
[0, 1]) and y (int [n]).
"""

from __future__ import annotations

import numpy as np

BATCH = 64
CLASSES = 10


def run(ctx):
    data = np.load(f"{ctx.data_dir}/digits.npz", allow_pickle=False)
    X = np.asarray(data["X"], dtype=np.float32)
    y = np.asarray(data["y"], dtype=np.int64)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"digits.npz: X {X.shape} and y {y.shape} do not match")
    n = int(X.shape[0])

    prob_sum = np.zeros(CLASSES, dtype=np.float64)
    confusion = np.zeros((CLASSES, CLASSES), dtype=np.float64)
    correct = 0
    for start in range(0, n, BATCH):
        probs = ctx.model.run({"input": X[start : start + BATCH]})["probs"]
        pred = probs.argmax(axis=1)
        truth = y[start : start + BATCH]
        prob_sum += probs.sum(axis=0, dtype=np.float64)
        np.add.at(confusion, (truth, pred), 1.0)
        correct += int((pred == truth).sum())

    runs = int(ctx.state.get("runs", 0)) + 1
    ctx.state["runs"] = runs
    ctx.log(f"evaluated {n} samples, {correct} correct (run {runs} on this device)")
    return {
        "sample_count": n,
        "metrics": {"accuracy": correct / n if n else 0.0},
        "tensors": {"mean_probs": prob_sum / max(n, 1), "confusion": confusion},
        "counts": {"samples": n, "correct": correct},
    }
