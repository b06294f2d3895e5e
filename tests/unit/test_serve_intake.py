"""The Serve intake tracer (``benchmarks/serve_intake``): the table ``analyze.py`` makes of a made-up trace folder,
and the probes of ``sitecustomize.py`` (inert without ``INTAKE_TRACE_DIR``, and never breaking a call)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "serve_intake"))

import analyze

INTAKE = Path(analyze.__file__).parent
PROXY = "ray::ProxyActor"
GATEWAY = "ray::ServeReplica:gateway:ArksGateway.initialize_and_get_metadata"


def write_tsv(folder: Path, pid: int, command: str, lines: list[tuple[Any, ...]]) -> None:
    rows = ["\t".join(str(x) for x in line) for line in lines]
    (folder / f"{pid}.tsv").write_text("\n".join([f"#\t{command}", *rows]) + "\n")


@pytest.fixture
def trace_dir(tmp_path: Path) -> Path:
    """Five requests; request i takes 10(i+1) ms from P0 to P4d, 100(i+1) ms from P4d to R0, 2 ms from R0 to R4."""
    proxy: list[tuple[Any, ...]] = [("warmup-1", "P0_uvicorn_headers", 990.0)]  # not bench-*: dropped
    gateway: list[tuple[Any, ...]] = [("-", "G1_grpc_rpc_accepted", 989.0, 1)]  # the warm-up's accept
    for i in range(5):
        rid, p0 = f"bench-{i}", 1000.0 + i
        p4d = p0 + 0.010 * (i + 1)
        r0 = p4d + 0.100 * (i + 1)
        proxy += [(rid, "P0_uvicorn_headers", f"{p0:.6f}"), (rid, "P4d_grpc_send_task_start", f"{p4d:.6f}")]
        gateway += [("-", "G1_grpc_rpc_accepted", f"{r0 - 0.001:.6f}", i + 2),
                    (rid, "R0_grpc_servicer_start", f"{r0:.6f}"), (rid, "R4_auth_middleware", f"{r0 + 0.002:.6f}")]
    proxy.append(("bench-0", "P0_uvicorn_headers", 2000.0))  # a later duplicate: the first time counts
    write_tsv(tmp_path, 100, PROXY, proxy)
    write_tsv(tmp_path, 200, GATEWAY, gateway)
    return tmp_path


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows}


def test_load_keys_stamps_by_role_keeps_the_first_time_and_drops_other_ids(trace_dir: Path) -> None:
    trace = analyze.load(trace_dir)
    assert sorted(trace.stamps) == [f"bench-{i}" for i in range(5)]
    assert trace.stamps["bench-0"][("proxy", "P0_uvicorn_headers")] == 1000.0
    assert trace.stamps["bench-0"][("gateway", "R0_grpc_servicer_start")] == pytest.approx(1000.11)
    assert len([e for e in trace.events if e[2] == "G1_grpc_rpc_accepted" and e[1] == "gateway"]) == 6


def test_steps_are_deltas_between_present_chain_steps_with_their_percentiles(trace_dir: Path) -> None:
    steps = analyze.steps(analyze.load(trace_dir))
    assert [(s["from"], s["to"]) for s in steps] == [
        ("P0_uvicorn_headers", "P4d_grpc_send_task_start"),
        ("P4d_grpc_send_task_start", "R0_grpc_servicer_start"),
        ("R0_grpc_servicer_start", "R4_auth_middleware"),
    ]
    hop = steps[1]
    assert hop["n"] == 5
    assert (hop["p50_ms"], hop["p90_ms"], hop["mean_ms"]) == pytest.approx((300.0, 460.0, 300.0))
    assert (steps[0]["p50_ms"], steps[0]["p90_ms"]) == pytest.approx((30.0, 46.0))
    assert steps[2]["p50_ms"] == pytest.approx(2.0)


def test_spans_cover_the_intake_and_the_grpc_hop_and_skip_spans_without_stamps(trace_dir: Path) -> None:
    spans = by_name(analyze.spans(analyze.load(trace_dir)))
    intake = spans["proxy's uvicorn to our middleware (P0->R4)"]
    assert intake["p50_ms"] == pytest.approx(332.0)  # 110(i+1) + 2 for i = 2
    assert spans["gRPC hop: proxy sends to servicer starts (P4d->R0)"]["p50_ms"] == pytest.approx(300.0)
    assert "client send (C0->C3)" not in spans


def test_accepts_pair_the_last_g1s_with_the_servicer_starts(trace_dir: Path) -> None:
    accept = analyze.accept(analyze.load(trace_dir))
    assert accept is not None
    assert (accept["n"], accept["p50_ms"]) == (5, pytest.approx(1.0))


def test_backlog_splits_servicer_start_spacing_by_calls_queued(tmp_path: Path) -> None:
    """Six calls sent at once, started 10 ms apart: the first three gaps start with >= 3 calls still waiting."""
    write_tsv(tmp_path, 1, PROXY, [(f"bench-{k}", "P4d_grpc_send_task_start", 1.0) for k in range(6)])
    write_tsv(tmp_path, 2, GATEWAY, [(f"bench-{k}", "R0_grpc_servicer_start", f"{2 + 0.01 * k:.6f}")
                                     for k in range(6)])
    backlog = analyze.backlog(analyze.load(tmp_path), min_queued=3)
    assert (backlog["queued"]["n"], backlog["otherwise"]["n"]) == (3, 2)
    assert backlog["queued"]["p50_ms"] == pytest.approx(10.0)
    assert backlog["queued"]["accepts_per_s"] == 100


def test_percentiles_interpolate_as_the_benchmarks_do_and_are_none_for_no_values() -> None:
    assert analyze.percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert analyze.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert analyze.row("empty", [])["p50_ms"] is None


def test_main_prints_the_table_and_writes_json(trace_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "summary.json"
    analyze.main([str(trace_dir), "--json", str(out)])
    assert "gRPC hop: proxy sends to servicer starts (P4d->R0)" in capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert (summary["requests"], summary["through"]) == (5, 5)
    assert summary["loop_lag"] is None


# --------------------------------------------------------------------------- the probes


def import_probes(name: str) -> ModuleType:
    """A fresh copy of ``sitecustomize.py`` under its own name (the interpreter may have its own sitecustomize)."""
    spec = importlib.util.spec_from_file_location(name, INTAKE / "sitecustomize.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probes_do_nothing_without_intake_trace_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INTAKE_TRACE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    finders = list(sys.meta_path)
    probes = import_probes("serve_intake_probes_inert")
    assert sys.meta_path == finders
    assert probes._writer is None
    assert list(tmp_path.iterdir()) == []


def test_a_probe_records_a_line_and_a_failing_one_never_breaks_the_call(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probes = import_probes("serve_intake_probes_live")
    writer = probes._Writer(str(tmp_path))
    monkeypatch.setattr(probes, "_writer", writer)

    class Middleware:
        async def __call__(self, scope: dict[str, Any]) -> str:
            return "answered"

        def broken(self, scope: dict[str, Any]) -> str:
            return "still answered"

    module = SimpleNamespace(__name__="fake", Middleware=Middleware)
    probes.attach(module, [
        ("Middleware.__call__", probes.around(probes.Stamp("R4_auth_middleware", probes._scope))),
        ("Middleware.broken", probes.around(probes.Stamp("R9_broken", lambda self, scope: scope["absent"]))),
        ("Missing.method", probes.around()),
    ])
    scope = {"headers": [(b"x-request-id", b"bench-7")]}
    assert asyncio.run(Middleware()(scope)) == "answered"
    assert Middleware().broken(scope) == "still answered"
    writer.close()
    (tsv,) = tmp_path.glob("*.tsv")
    lines = tsv.read_text().splitlines()
    assert lines[0].startswith("#\t")
    assert lines[1].split("\t")[:2] == ["bench-7", "R4_auth_middleware"]
    assert len(lines) == 2
    err = capsys.readouterr().err
    assert "[serve_intake] skipped fake.Missing.method" in err
    assert "[serve_intake] probe R9_broken failed" in err
