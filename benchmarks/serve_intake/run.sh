#!/usr/bin/env bash
# One traced run of the GPU benchmark's Ray stack on a mock engine, then the intake table (README.md here says why).
#
# usage: benchmarks/serve_intake/run.sh [OUT_DIR [extra gpu_side_by_side.py args...]]
#   OUT_DIR    default /tmp/serve_intake/c${CONC}-gw${GW}; gets trace/ (one TSV per process), bench/ (the
#              benchmark's own results), harness.log, table.txt and summary.json
#   CONC=128   client streams;  ROUNDS=1  load rounds;  GW=1  gateway replicas
#   NOTRACE=1  the same run without the probes (to compare the benchmark's own figures)
#   INTAKE_LAG_PROBE=1  also sample the replicas' event-loop lag
# Takes the repo's Ray lock (/tmp/arks-ray.lock) for the run and `ray stop`: one Ray stack at a time.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
CONC=${CONC:-128} ROUNDS=${ROUNDS:-1} GW=${GW:-1}
out=$(realpath -m "${1:-/tmp/serve_intake/c$CONC-gw$GW}")
shift || true
redis=$(command -v redis-server) || { echo "redis-server not found on PATH" >&2; exit 1; }

rm -rf "$out/trace" "$out/bench"
mkdir -p "$out"
cd "$repo"
if [ -z "${NOTRACE:-}" ]; then
  export INTAKE_TRACE_DIR="$out/trace"
fi
# sitecustomize.py is imported from here by the driver and, through the inherited environment, every Ray worker.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"

echo "run -> $out (waiting for /tmp/arks-ray.lock)"
# The benchmark's exit status is kept, but `ray stop` runs either way, inside the lock.
flock /tmp/arks-ray.lock bash -c '
  status=0
  .venv/bin/python benchmarks/gpu_side_by_side.py ray --gpus 0 --mock-engine 50,10,100 --concurrency "$1" \
    --rounds "$2" --gateways "$3" --redis-server "$4" --out "$5/bench" "${@:6}" || status=$?
  .venv/bin/ray stop --force
  exit $status
' run "$CONC" "$ROUNDS" "$GW" "$redis" "$out" "$@" >"$out/harness.log" 2>&1 || {
  echo "the benchmark failed; see $out/harness.log" >&2
  exit 1
}
grep -h "arks c=" "$out/harness.log" | sed 's/, per request.*//' || true
grep -h "\[serve_intake\]" "$out/harness.log" | sed "s/.*\[serve_intake\]/[serve_intake]/; s/ in pid [0-9]*//" | sort | uniq -c || true

if [ -z "${NOTRACE:-}" ]; then
  .venv/bin/python "$here/analyze.py" "$out/trace" --json "$out/summary.json" | tee "$out/table.txt"
fi
