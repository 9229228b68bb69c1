"""On a GPU machine: does backend selection pick ONNX Runtime's CUDA provider where it should?

Needs an onnxruntime build with CUDAExecutionProvider (`pip install
onnxruntime-gpu` in place of `onnxruntime`); MNN's pip wheel is CPU-only, so
its GPU backends are (correctly) found missing by the probe. Prints the device
profile, then per model every measured candidate and the choice, and exits 1
when CUDA is available but selection never chose it (EfficientNet-Lite0
should run faster on a GPU than on the CPU).

    python bench/gpu_check.py [--models efficientnet_lite0,cnn] [--budget 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    from tether.agent import backends, profile
    from tether.devtools import bench_runtime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,cnn,mlp")
    parser.add_argument("--budget", type=float, default=10.0)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    print("onnxruntime", ort.__version__, "providers:", ort.get_available_providers())
    p = profile.collect(measure=True)
    print("probed backends:", ", ".join(p.backends), "| gpus:", ", ".join(p.gpus) or "none")
    report = {"device": p.to_json(), "models": {}}
    chose_cuda = False
    for m in bench_runtime.load_models(HERE / "models", args.models.split(",")):
        sel = backends.select_model(m.spec, p, budget_s=args.budget)
        print(f"\n{m.name}: chosen {sel.chosen.key} ({sel.latency_ms:.4f} ms, selection {sel.seconds:.2f}s)")
        for x in sorted(sel.measurements, key=lambda x: (x.latency_ms is None, x.latency_ms or 0.0)):
            lat = f"{x.latency_ms:.4f} ms" if x.latency_ms is not None else x.error
            print(f"  {x.candidate.key:32} {lat}")
        for x in sel.pruned:
            print(f"  {x.candidate.key:32} pruned: {x.reason}")
        chose_cuda |= sel.chosen.backend_name == "onnxruntime/cuda"
        report["models"][m.name] = sel.to_json()
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(report, indent=2))
    if "onnxruntime/cuda" in p.backends and not chose_cuda:
        print("\nCUDA is available but selection chose it for no model", file=sys.stderr)
        return 1
    print("\nCUDA chosen for some model:", chose_cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
