"""The cold-start side of the GPU benchmark's report (``benchmarks/gpu_report.py``) and the start stages it reads
off Serve's logs (``benchmarks/gpu_probe.startup_timeline``), on made-up runs and logs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_probe
import gpu_report


def ours(answered: float, init: float = 30.0) -> dict[str, Any]:
    return {"ray_init_s": 5.0, "ray_and_serve_s": 12.0, "total_s": answered - 1.0, "serving_after_running_s": 1.0,
            "answered_s": answered,
            "timeline": [{"build_s": 3.0, "process_s": 18.0, "init_s": init, "noticed_s": 0.5, "engine_core_s": 1.0}]}


def run(label: str, raw: list[float], mine: list[dict[str, Any]]) -> dict[str, Any]:
    return {"startup": {f"cold_{label}": {"raw": [{"ready_s": r - 0.5, "answered_s": r, "engine_core_s": 2.0}
                                                  for r in raw], "ours": mine}}}


def test_cold_starts_give_medians_the_ratio_and_stages_that_add_up() -> None:
    data = run("default", [40.0, 50.0, 44.0], [ours(70.0), ours(60.0, init=25.0), {"error": "exit 1"}, ours(66.0)])
    (name, cold), = gpu_report.cold_starts(data).items()
    assert name == "default"
    assert cold["raw_median"] == 44.0
    assert cold["ours_median"] == 66.0
    assert cold["ratio"] == 1.5
    assert cold["failed"] == 1
    assert list(cold["stages"]) == gpu_report.STAGES
    assert cold["stages"]["ray.init"] == 5.0
    assert cold["stages"]["Serve"] == 7.0
    assert cold["stages"]["replica __init__"] == 30.0
    assert cold["engine_core"] == {"ours": 1.0, "raw": 2.0}
    for start in (ours(70.0), ours(60.0, init=25.0)):
        assert sum(gpu_report.stages(start)) == pytest.approx(start["answered_s"])


def test_the_report_has_a_cold_start_row_per_run_and_a_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    data = gpu_report.merge([])
    data["startup"].update(run("a", [40.0], [ours(70.0)])["startup"])
    data["startup"].update(run("b", [42.0, 44.0], [ours(80.0), ours(90.0)])["startup"])
    png = tmp_path / "cold.png"
    table = gpu_report.report(data, png)
    rows = [line for line in table.splitlines() if line.startswith(("| a |", "| b |"))]
    assert rows == ["| a | 70.0 | 40.0 | 1.75 | 5.0 | 7.0 | 3.0 | 18.0 | 30.0 | 7.0 | 1.0 / 2.0 |",
                    "| b | 80.0 / 90.0 | 42.0 / 44.0 | 1.98 | 5.0 | 7.0 | 3.0 | 18.0 | 30.0 | 22.0 | 1.0 / 2.0 |"]
    assert png.stat().st_size > 1000


def write_log(path: Path, lines: list[tuple[str, str]]) -> None:
    path.write_text("".join(f"INFO 2026-12-04 {at} controller 1 -- {msg}\n" for at, msg in lines))


def test_the_start_stages_come_from_serves_logs_and_a_cut_replica_log_ends_at_ready(tmp_path: Path) -> None:
    serve = tmp_path / "serve"
    serve.mkdir()
    write_log(serve / "controller_1.log", [
        ("05:52:14,441", "Deploying new app 'small'."),
        ("05:52:17,710", "Imported and built app 'small' successfully."),
        ("05:52:17,821", "Starting Replica(id='abc', deployment='arks-engine:small', app='small')."),
        ("05:53:07,272", "Replica(id='abc', deployment='arks-engine:small', app='small') started successfully."),
    ])
    replica = serve / "replica_small_arks-engine_small_abc.log"
    write_log(replica, [("05:52:36,121", "Started initializing replica.")])
    assert gpu_probe.startup_timeline("small", tmp_path) == [{"build_s": 3.3, "process_s": 18.3, "init_s": 31.2}]
    write_log(replica, [("05:52:36,121", "Started initializing replica."),
                        ("05:53:06,872", "Finished initializing replica.")])
    assert gpu_probe.startup_timeline("small", tmp_path) == [
        {"build_s": 3.3, "process_s": 18.3, "init_s": 30.8, "noticed_s": 0.4}]


def test_the_engine_core_start_comes_from_vllms_lines_in_the_replicas_worker_log(tmp_path: Path) -> None:
    serve = tmp_path / "serve"
    serve.mkdir()
    write_log(serve / "controller_1.log", [
        ("05:52:17,821", "Starting Replica(id='abc', deployment='arks-engine:small', app='small')."),
        ("05:52:50,000", "Replica(id='abc', deployment='arks-engine:small', app='small') started successfully.")])
    write_log(serve / "replica_small_arks-engine_small_abc.log", [("05:52:36,121", "Started initializing replica.")])
    (tmp_path / "worker-1-01000000-7.out").write_text(
        ":job_id:01000000\n:actor_name:ServeReplica:gateway:ArksGateway\n"
        "(EngineCore pid=9) INFO 12-04 05:52:37 [core.py:133] not this replica's\n")
    (tmp_path / "worker-2-01000000-8.out").write_text(
        ":job_id:01000000\n:actor_name:ServeReplica:small:arks-engine:small\n"
        "(MainProcess pid=8) INFO 12-04 05:52:37 [model.py:733] Resolved architecture: Qwen2ForCausalLM\n"
        "INFO 12-04 05:52:38 [compilation.py:317] Enabled custom fusions\n"
        "(EngineCore pid=10) INFO 12-04 05:52:44 [core.py:133] Initializing a V1 LLM engine\n"
        "(EngineCore pid=10) INFO 12-04 05:52:49 [core.py:200] later\n")
    (line,) = gpu_probe.startup_timeline("small", tmp_path)
    assert line["engine_core_s"] == 6.0
    raw = tmp_path / "raw_vllm.log"
    raw.write_text("(APIServer pid=1) INFO 12-04 05:37:03 [api_utils.py:347] args\n"
                   "(EngineCore pid=2) INFO 12-04 05:37:03 [core.py:133] Initializing\n")
    assert gpu_probe.engine_core_s(raw) == 0.0
    raw.write_text("(APIServer pid=1) INFO 12-04 05:37:03 [api_utils.py:347] args\n")
    assert gpu_probe.engine_core_s(raw) is None


def rounds(*tokens_and_ttft: tuple[float, float]) -> list[dict[str, Any]]:
    return [{"tokens_per_s": t, "ttft_p50_ms": ttft} for t, ttft in tokens_and_ttft]


def test_an_interleaved_run_pairs_ours_and_each_raw_variant_with_its_raw(tmp_path: Path) -> None:
    path = tmp_path / "gpu_ray_si.json"
    path.write_text(json.dumps({"targets": {
        "raw": {"32": rounds((1000, 50), (2000, 60))},
        "raw si8": {"32": rounds((1100, 40), (2400, 50))},
        "si8": {"32": rounds((900, 70), (2100, 66))}}}))
    data = gpu_report.merge([path])
    assert set(data["targets"]) == {"raw (beside si8)", "raw si8 (beside si8)", "si8"}
    ours, variant = data["paired"]["si8"]["32"], data["paired"]["raw si8 (beside si8)"]["32"]
    assert (ours["tokens_ratio"], ours["round_ratios"], ours["ttft_p50_extra_ms"]) == (1.0, [0.9, 1.05], 13.0)
    assert (variant["tokens_ratio"], variant["ttft_p50_extra_ms"]) == (1.167, -10.0)


def test_raw_variants_take_the_ports_after_raws_and_refuse_a_spec_without_args() -> None:
    import gpu_side_by_side

    args = argparse.Namespace(raw_variant=["si8:--stream-interval 8", "two:--a 1 --b"])
    assert gpu_side_by_side.raw_variants(args) == [
        ("raw si8", "http://127.0.0.1:8101", ("--stream-interval", "8")),
        ("raw two", "http://127.0.0.1:8102", ("--a", "1", "--b"))]
    with pytest.raises(SystemExit, match="NAME:ARGS"):
        gpu_side_by_side.raw_variants(argparse.Namespace(raw_variant=["si8"]))


PROXY = 'SessionName="s",actor_id="a1",component="proxy",loop_type="main"'
GATEWAY = 'actor_id="{}",application="gateway",component="replica",deployment="ArksGateway",loop_type="main"'


def metrics(p1: int, p5: int, g5: int, g100: int) -> str:
    """Ray's metrics page as it shows Serve's event-loop lag histograms: the proxy and two gateway replicas."""
    name = "ray_serve_event_loop_scheduling_latency_ms"
    rows = [(PROXY, "1.0", p1), (PROXY, "5.0", p5), (PROXY, "+Inf", p5),
            (GATEWAY.format("g1"), "5.0", g5), (GATEWAY.format("g1"), "100.0", g100),
            (GATEWAY.format("g1"), "+Inf", g100), (GATEWAY.format("g2"), "5.0", 0),
            (GATEWAY.format("g2"), "100.0", g100), (GATEWAY.format("g2"), "+Inf", g100)]
    router = "ray_serve_request_router_fulfillment_time_ms_bucket"
    waits = 'application="gateway",deployment="ArksGateway",handle_source="PROXY"'
    return "\n".join([f"# TYPE {name} histogram", *(f'{name}_bucket{{{tags},le="{le}"}} {n}' for tags, le, n in rows),
                      f"{name}_sum{{{PROXY}}} 9", f'{router}{{{waits},le="50.0"}} {p5}',
                      f'{router}{{{waits},le="+Inf"}} {p5}', ""])


def test_serves_waits_during_a_load_come_from_its_histograms_per_loop_and_router(tmp_path: Path) -> None:
    import http.server
    import threading

    texts = [metrics(10, 10, 5, 5), metrics(50, 60, 5, 105)]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = texts.pop(0).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        before = gpu_probe.serve_waits([url])
        after = gpu_probe.serve_waits([url])
    finally:
        server.shutdown()
    lag = gpu_probe.waits_between(before, after)
    assert set(lag) == {"loop lag proxy", "loop lag ArksGateway", "router wait ArksGateway (proxy)"}
    assert lag["router wait ArksGateway (proxy)"]["p50_le_ms"] == 50.0
    # 40 of the proxy's 50 new samples at or below 1 ms
    assert lag["loop lag proxy"] == {"samples": 50, "p50_le_ms": 1.0, "p90_le_ms": 5.0, "p99_le_ms": 5.0}
    # the two gateway replicas summed: 200 new samples, none at or below 5 ms
    assert lag["loop lag ArksGateway"] == {"samples": 200, "p50_le_ms": 100.0, "p90_le_ms": 100.0, "p99_le_ms": 100.0}


def test_an_engine_core_forked_by_the_fork_server_counts_as_the_engine_core() -> None:
    """The fork server's children keep its command line, whose sys_path names ray/_private: a GPU run counted
    our EngineCore's core as a Ray daemon's until this was found (top on the ninth-and-later H200)."""
    forked = ("/venv/bin/python3 -B -c from multiprocessing.forkserver import main; main(47, 49, "
              "['vllm.v1.engine.core'], **{'sys_path': ['/work/main', '/tmp/site/ray/_private']})")
    assert gpu_probe.role_of(forked, -1) == "engine_core"
    assert gpu_probe.role_of("/tmp/site/ray/core/src/ray/raylet/raylet --x", -1) == "ray_daemons"
    assert gpu_probe.role_of("VLLM::EngineCore", -1) == "engine_core"
