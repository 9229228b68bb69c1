#!/usr/bin/env bash
# Build Tether's images without a registry and smoke-test them (issue 10).
#
#   1. a Debian bookworm + python3.11 root filesystem made by mmdebstrap (cached in $TETHER_IMAGE_CACHE),
#   2. imported into buildah as the base image ($TETHER_BASE_IMAGE),
#   3. images/Containerfile built on it (`--build-arg BASE_IMAGE=...`): the cloud image and the agent image,
#   4. the controller, a Celery worker and the operator started FROM THE CLOUD IMAGE with
#      `buildah run --isolation chroot` (host network) against PostgreSQL and Redis on loopback (embedded ones,
#      or those TETHER_DATABASE_URL / TETHER_BROKER_URL name) and the Kubernetes API emulator: the controller's
#      gRPC health check answers SERVING, the worker answers a Celery ping, the operator logs in and handles an
#      MLTask (images/smoke.py); everything started is stopped and removed again, on failure too.
#
# Needs: buildah and mmdebstrap (apt-get install -y buildah mmdebstrap), root (or a user namespace buildah
# accepts), and a Python with tether[devtools] installed (the host side of the smoke test; $PYTHON).
# Every step has a timeout; a failing step names itself and shows its log.
set -euo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
PY=${PYTHON:-python3}
CACHE_DIR=${TETHER_IMAGE_CACHE:-$PWD/images/.cache}
BASE_IMAGE=${TETHER_BASE_IMAGE:-localhost/tether-base:bookworm-py311}
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
# The chart's default image is IMAGE_REPOSITORY:<appVersion> (charts/tether/values.yaml; tests/test_images.py).
IMAGE_REPOSITORY=${IMAGE_REPOSITORY:-ghcr.io/tether-dev/tether}
IMAGE=${TETHER_IMAGE:-$IMAGE_REPOSITORY:$VERSION}
AGENT_IMAGE=${TETHER_AGENT_IMAGE:-$IMAGE_REPOSITORY-agent:$VERSION}
# One value for both builds: a build argument that changes would defeat the layer cache of the builder stage.
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
ROOTFS="$CACHE_DIR/bookworm-py311.tar"
# The CA bundle pip inside the build trusts (a build secret; for TLS-intercepting proxies): pip's own setting,
# else the system's bundle.
PIP_CA_FILE=${PIP_CA_FILE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tether-images.XXXXXX")
export STORAGE_DRIVER=${STORAGE_DRIVER:-}  # buildah's default unless set (overlay, or vfs where overlay fails)
export BASE_IMAGE IMAGE AGENT_IMAGE MIRROR SECURITY_MIRROR ROOTFS PIP_CA_FILE VERSION REVISION CREATED

bh() { if [ -n "$STORAGE_DRIVER" ]; then buildah --storage-driver "$STORAGE_DRIVER" "$@"; else buildah "$@"; fi; }

export -f bh
elapsed() { echo "$(( $(date +%s) - START ))s"; }

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "build-and-smoke: FAILED after $(elapsed) (logs kept in $LOG_DIR)" >&2
  else
    rm -rf "$LOG_DIR"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# step NAME TIMEOUT_S COMMAND...: run one step (a command or a function of this script) under a timeout, in a
# fresh bash, its output in $LOG_DIR/NAME.log.
step() {
  local name=$1 limit=$2; shift 2
  local t0 log="$LOG_DIR/$name.log" rc=0
  t0=$(date +%s)
  echo "==> $name (timeout ${limit}s)"
  timeout --kill-after=20 "$limit" bash -c 'set -euo pipefail; "$@"' step "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "!!! step '$name' timed out after ${limit}s; last lines of $log:" >&2
    else
      echo "!!! step '$name' failed (exit $rc); last lines of $log:" >&2
    fi
    tail -n 40 "$log" >&2
    exit 1
  fi
  echo "    ok in $(( $(date +%s) - t0 ))s"
}

for tool in buildah mmdebstrap timeout; do
  command -v "$tool" >/dev/null || { echo "build-and-smoke: '$tool' not found (apt-get install -y buildah mmdebstrap)" >&2; exit 1; }
done
"$PY" -c "import tether.devtools.embedded, tether.controller.server" 2>/dev/null \
  || { echo "build-and-smoke: $PY cannot import tether[devtools] (pip install -e '.[devtools]')" >&2; exit 1; }
mkdir -p "$CACHE_DIR"

# 1. The base root filesystem, cached: reused when present (delete it to rebuild).
make_rootfs() {
  local tmp="$ROOTFS.partial"
  rm -f "$tmp"
  mmdebstrap --variant=minbase --mode=root --format=tar \
    --include=python3,python3-venv,ca-certificates,tzdata \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='chroot "$1" python3 -c "import sys, venv, ssl; assert sys.version_info[:2] == (3, 11), sys.version"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$tmp" \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY_MIRROR bookworm-security main"
  mv "$tmp" "$ROOTFS"
}
export -f make_rootfs
if [ -s "$ROOTFS" ]; then
  echo "==> rootfs: reusing $ROOTFS"
else
  step rootfs 900 make_rootfs
fi

# 2. Imported as the base image (again whenever the cached root filesystem is newer than the image).
import_base() {
  scratch=""
  bh rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
  scratch=$(bh from --quiet scratch)
  trap '[ -z "${scratch:-}" ] || bh rm "$scratch" >/dev/null 2>&1 || true' EXIT
  bh add "$scratch" "$ROOTFS" /
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 --label org.opencontainers.image.base.name=debian:bookworm "$scratch"
  bh commit --quiet "$scratch" "$BASE_IMAGE"
}
export -f import_base
if bh inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 \
   && [ "$CACHE_DIR/base.stamp" -nt "$ROOTFS" ]; then
  echo "==> base image: reusing $BASE_IMAGE"
else
  step import-base 300 import_base
  touch "$CACHE_DIR/base.stamp"
fi

# 3. The images. --layers: the agent build reuses the builder stage of the cloud build.
build_image() {
  local target=$1 tag=$2 secret=()
  if [ -s "$PIP_CA_FILE" ]; then secret=(--secret "id=pip-ca,src=$PIP_CA_FILE"); fi
  bh build "${secret[@]}" --isolation chroot --network host --layers --force-rm --pull-never \
    -f images/Containerfile --target "$target" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" --build-arg CREATED="$CREATED" \
    -t "$tag" .
}
export -f build_image
step build-cloud 900 build_image cloud "$IMAGE"
step build-agent 600 build_image agent "$AGENT_IMAGE"

# 4. The smoke test (its own per-check deadlines; this is the outer bound).
step smoke 420 "$PY" images/smoke.py --image "$IMAGE" --agent-image "$AGENT_IMAGE" \
  --log-dir "$LOG_DIR"
cat "$LOG_DIR/smoke.log"

echo "==> image sizes"
bh images --format '{{.Name}}:{{.Tag}}  {{.Size}}' \
  | grep -E "^($IMAGE|$AGENT_IMAGE|$BASE_IMAGE)  " || bh images
echo "build-and-smoke: passed in $(elapsed)"
