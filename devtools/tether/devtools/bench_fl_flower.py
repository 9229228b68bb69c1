"""`tether bench fl`'s baseline: the same rounds run by Flower's own simulation engine (flwr 1.42, Ray).

Run as a child process by `tether.devtools.bench_fl` with an interpreter that
has `flwr[simulation]` (its pins, protobuf < 7 among them, clash with
Tether's, so it usually lives in an environment of its own):

    python -m tether.devtools.bench_fl_flower --inputs inputs.npz --out flower.json

It imports numpy, flwr and the example's `fltrain.py` (by path) only, never
Tether's own packages, so the two systems share nothing but the inputs file:
the devices' shards, the held-out set, the round-0 weights, the
hyper-parameters and the participants of every round (`schedule`, fixed by the
benchmark for both systems).

Flower does the rest its own way: a `ServerApp` running the message-based
`FedAvg` strategy (`flwr.serverapp.strategy.FedAvg`, sample-weighted mean of
the returned weights by "num-examples"), a `ClientApp` per virtual SuperNode
on Ray actors, `flwr.simulation.run_simulation` with 100 SuperNodes. The only
change to the strategy is `configure_train`: instead of drawing nodes at
random it sends round r's message to as many nodes as the schedule has
devices and names in each the device whose shard that virtual client trains
on. Centralized evaluation (`evaluate_fn`, numpy) scores the global model on
the held-out set after every round; a round's time is the wall time between
two such evaluations (training, transport, aggregation, evaluation).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

_CACHE: dict[str, Any] = {}


def _inputs(path: str) -> dict[str, Any]:
    """The inputs file, loaded once per process (each Ray actor is a process of its own)."""
    if path not in _CACHE:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        data["hyper"] = json.loads(str(data["hyper_json"]))
        spec = importlib.util.spec_from_file_location("digits_fl_fltrain", data["hyper"]["fltrain"])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        data["fltrain"] = module
        _CACHE[path] = data
    return _CACHE[path]


def _shard(data: dict[str, Any], device: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = int(data["offsets"][device]), int(data["offsets"][device + 1])
    return data["X"][lo:hi], data["y"][lo:hi]


def _weights(names: list[str], data: dict[str, Any]) -> dict[str, np.ndarray]:
    return {n: data[f"w:{n}"] for n in names}


def build_apps(inputs: str) -> tuple[Any, Any, dict[str, Any]]:
    """The ClientApp, the ServerApp and the dict the server fills with its per-round results."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    data = _inputs(inputs)
    hyper = data["hyper"]
    names: list[str] = list(hyper["names"])
    schedule = data["schedule"]
    results: dict[str, Any] = {"accuracy": [], "loss": [], "round_s": [], "participants": []}

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        d = _inputs(str(msg.content["config"]["inputs"]))
        h = d["hyper"]
        device = int(msg.content["config"]["device"])
        X, y = _shard(d, device)
        arrays = msg.content["arrays"]
        weights = {k: np.array(arrays[k].numpy(), dtype=np.float32) for k in h["names"]}
        new, metrics = d["fltrain"].train(
            weights,
            X,
            y,
            lr=float(h["lr"]),
            batch=int(h["batch"]),
            epochs=int(h["epochs"]),
            seed=int(msg.content["config"]["batch-seed"]),
        )
        reply = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(np.ascontiguousarray(new[k])) for k in h["names"]}),
                "metrics": MetricRecord({"num-examples": len(y), "train-loss": float(metrics["loss_after"])}),
            }
        )
        return Message(content=reply, reply_to=msg)

    class ScheduledFedAvg(FedAvg):
        """Flower's FedAvg with the benchmark's participants: round r trains the devices of schedule[r - 1]."""

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> list[Message]:
            devices = [int(d) for d in schedule[server_round - 1]]
            while len(nodes := sorted(grid.get_node_ids())) < len(devices):
                time.sleep(0.05)
            results["participants"].append(devices)
            out = []
            for node, device in zip(nodes, devices, strict=False):
                cfg = ConfigRecord(
                    {
                        "server-round": server_round,
                        "device": device,
                        "inputs": inputs,
                        "batch-seed": int(hyper["seed"]) * 1_000_003 + server_round,
                    }
                )
                content = RecordDict({"arrays": arrays, "config": cfg})
                out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
            return out

    server = ServerApp()
    marks: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        weights = {k: np.array(arrays[k].numpy(), dtype=np.float32) for k in names}
        scores = data["fltrain"].evaluate(weights, data["X_test"], data["y_test"])
        results["accuracy"].append(scores["accuracy"])
        results["loss"].append(scores["loss"])
        now = time.perf_counter()
        if marks:
            results["round_s"].append(now - marks[-1])
        marks.append(now)
        print(
            f"flower: round {server_round}/{len(schedule)} accuracy {scores['accuracy']:.3f}",
            file=sys.stderr,
            flush=True,
        )
        return MetricRecord({"accuracy": scores["accuracy"], "loss": scores["loss"]})

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = ScheduledFedAvg(fraction_evaluate=0.0, min_available_nodes=len(data["offsets"]) - 1)
        initial = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in _weights(names, data).items()})
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=len(schedule), evaluate_fn=evaluate)

    return client, server, results


def run(inputs: str, *, cpus: int) -> dict[str, Any]:
    import flwr
    import ray
    from flwr.simulation import run_simulation

    client, server, results = build_apps(inputs)
    devices = len(_inputs(inputs)["offsets"]) - 1
    started = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=devices,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False},
        },
    )
    return {
        "engine": f"flwr {flwr.__version__} run_simulation (ray {ray.__version__}), {devices} SuperNodes",
        "client_resources": {"num_cpus": 1},
        "ray_cpus": cpus,
        "wall_s": time.perf_counter() - started,
        **results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Flower's half of `tether bench fl`.")
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args(argv)
    report = run(str(pathlib.Path(args.inputs).resolve()), cpus=args.cpus)
    pathlib.Path(args.out).write_text(json.dumps(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
