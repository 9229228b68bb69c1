"""digits-fl: one federated round on the device: global weights in, the weights delta out.

Runs on the device inside Tether's task worker. Imports numpy, MNN and
safetensors (all three come with the agent) and `fltrain` from its own bundle.

A round run is an on-demand run from the controller's round driver; its
payload carries `{"federated": {"task", "round", "modelFile",
"updateEncoding", "proximalMu"?, "clipNorm"?, "noiseMultiplier"?}}`
(docs/task-api.md, "Federated tasks"). The task:

1. loads the round's global model from the bundle's safetensors file
   (`modelFile`, default `model.safetensors`: the only file that changes
   between rounds, so the only blob a device pulls again);
2. loads the device's local data, `<data_dir>/digits.npz` (X float32 [n, 64]
   in [0, 1], y int64 [n]);
3. runs `fltrain.train`: one local epoch of SGD, lr 0.1, batch 32, the batch
   order seeded by the round number (FedProx's proximal term when the round
   hands it `proximalMu`);
4. with local DP (`clipNorm`, `noiseMultiplier`), clips the delta to
   `clipNorm` (L2 over all tensors) and adds N(0, (noiseMultiplier ·
   clipNorm)²) noise from the OS's entropy;
5. returns `tensors` = new - global for every tensor (float32, the model's
   names), `sample_count` = local samples, and as metrics the local `loss`
   and `accuracy` after training and `eval_loss` / `eval_accuracy`: the
   received global model evaluated on the device's local data *before*
   training (federated evaluation: the cloud's sample-weighted mean of these
   over a round's updates is the global model's score on the participants'
   data, next to the server-side score on the held-out set).

Outside a round (a manual on-demand run) the payload's top level may set
`lr`, `batch`, `epochs`, `seed`, `round` and `modelFile`.
"""

from __future__ import annotations

import os

import fltrain
import numpy as np

MODEL_FILE = "model.safetensors"
DEFAULTS = {"lr": 0.1, "batch": 32, "epochs": 1, "seed": 0, "round": None, "modelFile": MODEL_FILE}


def hyper(ctx) -> dict:
    payload = (getattr(ctx, "inputs", None) or {}).get("payload") or {}
    h = dict(DEFAULTS)
    h.update({k: payload[k] for k in DEFAULTS if k in payload})
    fed = payload.get("federated") or {}
    for key in ("round", "modelFile"):
        if key in fed:
            h[key] = fed[key]
    h["proximalMu"] = float(fed.get("proximalMu", payload.get("proximalMu", 0.0)))
    h["clipNorm"] = fed.get("clipNorm")
    h["noiseMultiplier"] = fed.get("noiseMultiplier")
    if not (0 < float(h["lr"]) <= 10 and 1 <= int(h["batch"]) <= 4096 and 1 <= int(h["epochs"]) <= 50):
        raise ValueError(f"hyper-parameters out of range: {h}")
    if not 0 <= h["proximalMu"] <= 1e4:
        raise ValueError(f"proximalMu must be in [0, 1e4], got {h['proximalMu']!r}")
    name = str(h["modelFile"])
    if name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"modelFile must be a file of the bundle, got {name!r}")
    return h


def load_weights(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    weights = load_file(path)
    fltrain.check_weights(weights)
    return weights


def local_dp(delta: dict[str, np.ndarray], *, clip_norm: float, noise_multiplier: float) -> dict[str, np.ndarray]:
    """Clip the whole delta to `clip_norm` (L2) and add Gaussian noise of std noise_multiplier · clip_norm."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    rng = np.random.default_rng()
    std = noise_multiplier * clip_norm
    return {k: (d * scale + rng.normal(0.0, std, size=d.shape)).astype(d.dtype) for k, d in delta.items()}


def run(ctx):
    h = hyper(ctx)
    weights = load_weights(os.path.join(ctx.bundle_dir, h["modelFile"]))
    with np.load(os.path.join(ctx.data_dir, "digits.npz"), allow_pickle=False) as data:
        X = np.ascontiguousarray(data["X"], dtype=np.float32)
        y = np.asarray(data["y"], dtype=np.int64)
    # The round number makes each round's batch order differ; without one, count the runs on this device.
    round_number = int(h["round"]) if h["round"] is not None else int(ctx.state.get("runs", 0)) + 1
    new, metrics = fltrain.train(
        weights,
        X,
        y,
        lr=float(h["lr"]),
        batch=int(h["batch"]),
        epochs=int(h["epochs"]),
        seed=fltrain.batch_seed(int(h["seed"]), round_number),
        proximal_mu=h["proximalMu"],
    )
    delta = {name: new[name] - weights[name] for name in fltrain.NAMES}
    if h["clipNorm"] is not None:
        delta = local_dp(delta, clip_norm=float(h["clipNorm"]), noise_multiplier=float(h["noiseMultiplier"] or 0.0))
    ctx.state["runs"] = int(ctx.state.get("runs", 0)) + 1
    ctx.log(
        f"round {round_number}: {int(metrics['steps'])} steps on {len(y)} samples, "
        f"loss {metrics['loss_before']:.4f} -> {metrics['loss_after']:.4f}"
    )
    return {
        "sample_count": len(y),
        "metrics": {
            "loss": metrics["loss_after"],
            "accuracy": metrics["accuracy_after"],
            "eval_loss": metrics["loss_before"],
            "eval_accuracy": metrics["accuracy_before"],
        },
        "tensors": delta,
        "counts": {"steps": int(metrics["steps"])},
    }
