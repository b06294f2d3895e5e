"""Where a request's time goes between the client and our ASGI middleware, from the probes' traces.

Reads the per-process TSVs that ``sitecustomize.py`` writes (``run.sh`` runs both) and gives, in milliseconds:

- ``steps``: p50/p90/mean of the delta between consecutive steps of the proxy -> gateway path (``CHAIN``), per
  request, over the steps that request has;
- ``spans``: longer stretches (``SPANS``), e.g. the proxy's uvicorn to our middleware and the gRPC hop inside it;
- ``side``: steps off the chain, against the chain step they follow (``SIDE``);
- ``backlog``: how far apart the gateway starts handlers while calls are queued for it, i.e. its accept rate;
- ``accept``: grpc's accept (G1) to Serve's servicer start (R0) on the gateway.

Used by ``run.sh`` and the unit tests (``tests/unit/test_serve_intake.py``). usage: ``analyze.py TRACE_DIR
[--json PATH]``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

Key = tuple[str, str]
"""(role, step): the same step names come from the proxy's and the gateway's router, for example."""

CHAIN: list[Key] = [
    ("client", "C0_httpx_send"),
    ("client", "C1_conn_ready"),
    ("client", "C2_headers_written"),
    ("client", "C3_body_written"),
    ("proxy", "P0_uvicorn_headers"),
    ("proxy", "P1_proxy_asgi_call"),
    ("proxy", "P2_router_task_start"),
    ("proxy", "P3_replica_chosen"),
    ("proxy", "P4a_grpc_send"),
    ("proxy", "P4b_grpc_call_created"),
    ("proxy", "P4c_inner_call_created"),
    ("proxy", "P4d_grpc_send_task_start"),
    ("proxy", "P4e_grpc_send_done"),
    ("gateway", "R0_grpc_servicer_start"),
    ("gateway", "R1a_unpack_start"),
    ("gateway", "R1b_unpack_end"),
    ("gateway", "R1_accepted"),
    ("gateway", "R3_http_entrypoint_call"),
    ("gateway", "R4_auth_middleware"),
]
"""The steps of a request's way in, in order; ``steps`` covers requests that have P0 and R4."""

_BY_NAME = {step.split("_")[0]: (role, step) for role, step in CHAIN}

SPANS: dict[str, tuple[str, str]] = {
    "client to our middleware (C0->R4)": ("C0", "R4"),
    "proxy's uvicorn to our middleware (P0->R4)": ("P0", "R4"),
    "client send (C0->C3)": ("C0", "C3"),
    "wire + proxy's uvicorn (C3->P0)": ("C3", "P0"),
    "proxy: uvicorn to gRPC call (P0->P4b)": ("P0", "P4b"),
    "proxy: gRPC call to its send task (P4b->P4d)": ("P4b", "P4d"),
    "gRPC hop: proxy sends to servicer starts (P4d->R0)": ("P4d", "R0"),
    "replica wrapper to our middleware (R0->R4)": ("R0", "R4"),
}
"""Name -> (from, to) by step prefix; each over the requests that have both ends."""

SIDE: list[tuple[Key, Key]] = [
    (("proxy", "P5_initial_metadata"), ("proxy", "P4b_grpc_call_created")),
    (("proxy", "P5b_router_assigned"), ("proxy", "P4b_grpc_call_created")),
    (("proxy", "P7_proxy_receive_asgi_called"), ("gateway", "R4_auth_middleware")),
    (("gateway", "R5_first_body_msg"), ("gateway", "R4_auth_middleware")),
]
"""(step, reference): off-chain steps, reported as step - reference."""

MIN_SHARE = 0.05
"""A step pair seen in fewer than this share of the requests (a probe that fired only sometimes) is left out."""


@dataclass
class Trace:
    """A trace folder, read: request ids' first time per (role, step), and the rid-less events per process."""

    stamps: dict[str, dict[Key, float]] = field(default_factory=dict)
    events: list[tuple[str, str, str, float, str]] = field(default_factory=list)
    """(file name, role, step, unix time, value) of ``-`` lines: G1 accepts, LAG_ms."""


def role_of(command: str) -> str:
    """Which part of the stack a process is, from the command line at the head of its TSV."""
    for marker, role in (("ProxyActor", "proxy"), ("ArksGateway", "gateway"), ("MockEngine", "engine"),
                         ("gpu_side_by_side", "client")):
        if marker in command:
            return role
    return "other"


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, computed as the benchmark's own figures are (interpolating
    between ranks); NaN when there are none."""
    from arks_ray.autoscaling.replica import percentile as interpolated

    return interpolated(values, q) if values else float("nan")


def load(trace_dir: Path, prefix: str = "bench-") -> Trace:
    """Reads every ``*.tsv``; request ids not starting with ``prefix`` (warm-up, health checks) are dropped."""
    trace = Trace()
    for path in sorted(trace_dir.glob("*.tsv")):
        role = "other"
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if parts[0] == "#":
                role = role_of(parts[1] if len(parts) > 1 else "")
            elif parts[0] == "-" and len(parts) >= 3:
                trace.events.append((path.name, role, parts[1], float(parts[2]), parts[3] if len(parts) > 3 else ""))
            elif len(parts) >= 3 and parts[0].startswith(prefix):
                times = trace.stamps.setdefault(parts[0], {})
                key, t = (role, parts[1]), float(parts[2])
                if t < times.get(key, float("inf")):
                    times[key] = t
    return trace


def row(name: str, deltas_s: list[float]) -> dict[str, Any]:
    """n, p50, p90 and mean of ``deltas_s`` (seconds), in ms; None for no values."""
    ms = [d * 1e3 for d in deltas_s]
    if not ms:
        return {"name": name, "n": 0, "p50_ms": None, "p90_ms": None, "mean_ms": None}
    return {"name": name, "n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p90_ms": round(percentile(ms, 90), 2),
            "mean_ms": round(statistics.fmean(ms), 2)}


def through(trace: Trace) -> list[str]:
    """The requests seen both at the proxy's uvicorn and at our middleware."""
    first, last = _BY_NAME["P0"], CHAIN[-1]
    return [rid for rid, times in trace.stamps.items() if first in times and last in times]


def steps(trace: Trace) -> list[dict[str, Any]]:
    """Delta from each chain step to the next one the request has (a missing probe merges two steps)."""
    deltas: dict[tuple[Key, Key], list[float]] = defaultdict(list)
    rids = through(trace)
    for rid in rids:
        present = [key for key in CHAIN if key in trace.stamps[rid]]
        for a, b in pairwise(present):
            deltas[(a, b)].append(trace.stamps[rid][b] - trace.stamps[rid][a])
    order = sorted(deltas, key=lambda pair: (CHAIN.index(pair[0]), CHAIN.index(pair[1])))
    return [{**row(f"{a[1]} -> {b[1]}", deltas[(a, b)]), "from": a[1], "to": b[1]}
            for a, b in order if len(deltas[(a, b)]) >= MIN_SHARE * len(rids)]


def spans(trace: Trace) -> list[dict[str, Any]]:
    """``SPANS`` that any request has both ends of."""
    out = []
    for name, (a, b) in SPANS.items():
        ka, kb = _BY_NAME[a], _BY_NAME[b]
        deltas = [times[kb] - times[ka] for times in trace.stamps.values() if ka in times and kb in times]
        if deltas:
            out.append(row(name, deltas))
    return out


def side(trace: Trace) -> list[dict[str, Any]]:
    """``SIDE`` steps against their references."""
    out = []
    for key, ref in SIDE:
        deltas = [times[key] - times[ref] for times in trace.stamps.values() if key in times and ref in times]
        if deltas:
            out.append(row(f"{key[1]} - {ref[1]}", deltas))
    return out


def backlog(trace: Trace, min_queued: int = 5) -> dict[str, Any]:
    """Spacing of consecutive servicer starts (R0) on the gateway, split by whether at least ``min_queued``
    calls were sent (P4d) but not yet started at the first of the two: while calls queue, the spacing is the
    time the gateway needs per accept."""
    sent = sorted(t[_BY_NAME["P4d"]] for t in trace.stamps.values() if _BY_NAME["P4d"] in t)
    started = sorted(t[_BY_NAME["R0"]] for t in trace.stamps.values() if _BY_NAME["R0"] in t)
    queued, idle = [], []
    for a, b in pairwise(started):
        waiting = bisect.bisect_right(sent, a) - bisect.bisect_right(started, a)
        (queued if waiting >= min_queued else idle).append(b - a)
    busy = row(f"R0 spacing while >= {min_queued} calls queued", queued)
    if queued:
        busy["p10_ms"] = round(percentile([g * 1e3 for g in queued], 10), 2)
    busy["accepts_per_s"] = round(1e3 / busy["p50_ms"]) if busy["p50_ms"] else None
    return {"min_queued": min_queued, "queued": busy, "otherwise": row("R0 spacing otherwise", idle)}


def accept(trace: Trace) -> dict[str, Any] | None:
    """grpc's accept (G1) to the servicer start (R0) on the gateway. G1 carries no request id, so the k-th accept
    is paired with the k-th start counting from the end (the gateway's warm-up calls come first): an estimate."""
    g1 = sorted(t for _, role, step, t, _ in trace.events if role == "gateway" and step == "G1_grpc_rpc_accepted")
    r0 = sorted(t[_BY_NAME["R0"]] for t in trace.stamps.values() if _BY_NAME["R0"] in t)
    n = min(len(g1), len(r0))
    if not n:
        return None
    return row("G1 accepted -> R0 servicer start (k-th with k-th)", [s - a for a, s in zip(g1[-n:], r0[-n:],
                                                                                           strict=True)])


def loop_lag(trace: Trace) -> dict[str, Any] | None:
    """The gateway's event-loop lag probe (``INTAKE_LAG_PROBE=1``) while it started handlers."""
    r0 = [t[_BY_NAME["R0"]] for t in trace.stamps.values() if _BY_NAME["R0"] in t]
    lag = [float(v) / 1e3 for _, role, step, t, v in trace.events
           if role == "gateway" and step == "LAG_ms" and r0 and min(r0) <= t <= max(r0)]
    return row("gateway loop lag (timer lateness)", lag) if lag else None


def summarise(trace_dir: Path) -> dict[str, Any]:
    """Everything above for one trace folder, as a JSON-ready dict."""
    trace = load(trace_dir)
    return {"trace_dir": str(trace_dir), "requests": len(trace.stamps), "through": len(through(trace)),
            "steps": steps(trace), "spans": spans(trace), "side": side(trace), "backlog": backlog(trace),
            "accept": accept(trace), "loop_lag": loop_lag(trace)}


def _line(r: dict[str, Any], width: int = 52) -> str:
    figures = " ".join("       -" if r[k] is None else f"{r[k]:8.1f}" for k in ("p50_ms", "p90_ms", "mean_ms"))
    return f"{r['name'][:width]:{width}s} {r['n']:5d} {figures}"


def report(summary: dict[str, Any]) -> str:
    """The summary as the text table ``run.sh`` prints."""
    head = f"{'':52s} {'n':>5s} {'p50 ms':>8s} {'p90 ms':>8s} {'mean ms':>8s}"
    lines = [f"{summary['trace_dir']}: {summary['requests']} requests, {summary['through']} seen from the proxy's "
             "uvicorn (P0) to our middleware (R4)", "", "step (to the next step the request has)", head]
    lines += [_line(r) for r in summary["steps"]]
    lines += ["", "spans", head, *(_line(r) for r in summary["spans"])]
    lines += ["", "off the chain", head, *(_line(r) for r in summary["side"])]
    lines += ["", "gateway accepts", head, _line(summary["backlog"]["queued"]), _line(summary["backlog"]["otherwise"])]
    lines += [_line(summary[key]) for key in ("accept", "loop_lag") if summary[key]]
    rate = summary["backlog"]["queued"]["accepts_per_s"]
    if rate:
        lines.append(f"=> about {rate} accepts/s while calls queue")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace_dir", type=Path, help="the folder of <pid>.tsv files (INTAKE_TRACE_DIR)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the summary as JSON here")
    args = ap.parse_args(argv)
    if not any(args.trace_dir.glob("*.tsv")):
        sys.exit(f"{args.trace_dir}: no *.tsv files (was INTAKE_TRACE_DIR set, and PYTHONPATH holding the probes?)")
    summary = summarise(args.trace_dir)
    print(report(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
