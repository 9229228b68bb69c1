"""digits-fl: one federated round on the device: global weights in, the weights delta out.

Runs on the device inside Tether's task worker. Imports numpy, MNN and
safetensors (all three come with the agent) and `fltrain` from its own bundle.

1. Loads the round's global model from the bundle's safetensors file
   (`global.safetensors`; the cloud writes the next round's file, and as the
   only file that changes between rounds it is the only blob a device pulls).
2. Loads the device's local data, `<data_dir>/digits.npz` (X float32 [n, 64]
   in [0, 1], y int64 [n]).
3. Runs `fltrain.train`: one local epoch of SGD, lr 0.1, batch 32 (FedProx's
   proximal term when the round hands it `proximalMu`).
4. Returns `tensors` = new - global per tensor (float32, the model's names),
   `sample_count` = local samples, and the local loss and accuracy before and
   after training as metrics.

Hyper-parameters come from the run's payload (`ctx.inputs["payload"]`) or the
defaults below: {"lr", "batch", "epochs", "seed", "round", "proximalMu",
"weights"}. The batch order is seeded by `seed` and the round, so a round is
reproducible on a device.
"""

from __future__ import annotations

import os

import fltrain
import numpy as np

WEIGHTS_FILE = "global.safetensors"
DEFAULTS = {"lr": 0.1, "batch": 32, "epochs": 1, "seed": 0, "round": None, "proximalMu": 0.0, "weights": WEIGHTS_FILE}


def hyper(ctx) -> dict:
    payload = (getattr(ctx, "inputs", None) or {}).get("payload") or {}
    h = dict(DEFAULTS)
    h.update({k: payload[k] for k in DEFAULTS if k in payload})
    if not (0 < float(h["lr"]) <= 10 and 1 <= int(h["batch"]) <= 4096 and 1 <= int(h["epochs"]) <= 50):
        raise ValueError(f"hyper-parameters out of range: {h}")
    if not 0 <= float(h["proximalMu"]) <= 1e4:
        raise ValueError(f"proximalMu must be in [0, 1e4], got {h['proximalMu']!r}")
    name = str(h["weights"])
    if name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"weights must be a file of the bundle, got {name!r}")
    return h


def load_weights(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    weights = load_file(path)
    fltrain.check_weights(weights)
    return weights


def run(ctx):
    h = hyper(ctx)
    weights = load_weights(os.path.join(ctx.bundle_dir, h["weights"]))
    with np.load(os.path.join(ctx.data_dir, "digits.npz"), allow_pickle=False) as data:
        X = np.ascontiguousarray(data["X"], dtype=np.float32)
        y = np.asarray(data["y"], dtype=np.int64)
    # A round number makes each round's batch order differ; without one, count the runs on this device.
    round_number = int(h["round"]) if h["round"] is not None else int(ctx.state.get("runs", 0))
    new, metrics = fltrain.train(
        weights,
        X,
        y,
        lr=float(h["lr"]),
        batch=int(h["batch"]),
        epochs=int(h["epochs"]),
        seed=int(h["seed"]) * 1_000_003 + round_number,
        proximal_mu=float(h["proximalMu"]),
    )
    ctx.state["runs"] = int(ctx.state.get("runs", 0)) + 1
    ctx.log(
        f"round {round_number}: {int(metrics['steps'])} steps on {len(y)} samples, "
        f"loss {metrics['loss_before']:.4f} -> {metrics['loss_after']:.4f}"
    )
    return {
        "sample_count": len(y),
        "metrics": {k: v for k, v in metrics.items() if k != "steps"},
        "tensors": {name: new[name] - weights[name] for name in fltrain.NAMES},
        "counts": {"steps": int(metrics["steps"])},
    }
