"""Probes for ``gpu_side_by_side.py``: CPU per process and thread, chunk counts per hop, py-spy profiles.

- ``CpuSampler``: reads ``/proc`` before and after a load; cores used per *role* (Serve proxy, gateway
  replica, engine replica, vLLM EngineCore, raw API server, client, Redis, Ray's own daemons), and the
  busiest threads of the busiest processes (a Python replica whose main thread sits at one core is the
  bottleneck, whatever the process total says);
- ``handle_load``: the same streaming chats sent straight to the engine deployment through a Serve handle
  from the driver, skipping the Serve proxy and the gateway: the difference to the full path is what the
  proxy, the gateway and their extra hop cost;
- ``gateway_view``: what the gateway replicas saw of the same load, from their JSON access log: time to
  the first engine output and the gateway's own time before asking the engine, per request. The client's
  TTFT minus the gateway's is what the Serve proxy and the HTTP hops in and out add;
- ``profile``: ``py-spy record`` on the replicas during one extra load, then the top functions by self
  time per process (the raw stacks are kept for reading later);
- ``startup_timeline``: where an engine app's start went, from Serve's own logs: the build task, the
  replica's process until its ``__init__`` runs, the ``__init__`` (the engine, or the vLLM server, starting),
  and Serve's notice after it;
- ``serve_waits`` / ``waits_between``: during a load, how late each Serve event loop (the proxy's, each
  deployment's replicas') woke up, and how long requests waited in a router for a replica, from Ray Serve's own
  histograms on Ray's metrics endpoint.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

HZ = os.sysconf("SC_CLK_TCK")

ROLES = (  # first match wins: (role, substring of the command line)
    ("proxy", "ray::ProxyActor"),
    ("gateway", "ray::ServeReplica:gateway:"),
    ("stock_ingress", "OpenAiIngress"),
    ("engine_replica", "ray::ServeReplica:"),
    ("engine_core", "EngineCore"),
    # An EngineCore forked by deployments.engine_start's fork server keeps the fork server's command line, which
    # names the module it preloads (and, in its sys_path, ray/_private: it would count as a Ray daemon).
    ("engine_core", "'vllm.v1.engine.core'"),
    ("engine_worker", "ray::RayWorkerWrapper"),
    ("serve_controller", "ray::ServeController"),
    ("redis", "redis-server"),
    ("sidecar_shim", "def kill_group"),  # deployments.dynamo_sidecars' shim: its argv holds the server's
    ("raw_api_server", "vllm.entrypoints.openai.api_server"),  # raw, or an engineFrontend vllmServer replica's
    ("ray_daemons", "raylet"),
    ("ray_daemons", "gcs_server"),
    ("ray_daemons", "ray/dashboard"),
    ("ray_daemons", "ray/_private"),
    ("ray_idle_workers", "ray::IDLE"),
)


def role_of(cmd: str, pid: int) -> str:
    if pid == os.getpid():
        return "client"
    for role, needle in ROLES:
        if needle in cmd:
            return role
    return "other"


def _procs() -> dict[int, tuple[int, str]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        parts = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (int(parts[11]) + int(parts[12]), cmd or stat.split("(", 1)[1].rsplit(")", 1)[0])
    return out


def _threads(pid: int) -> dict[int, tuple[int, str]]:
    out = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat.split("(", 1)[1].rsplit(")", 1)[0]
        parts = stat.rsplit(")", 1)[1].split()
        out[int(task.name)] = (int(parts[11]) + int(parts[12]), name)
    return out


class CpuSampler:
    """Cores used per role (and per busy thread) between ``start`` and ``stop``."""

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.p0 = _procs()
        self.th0 = {pid: _threads(pid) for pid, (_, cmd) in self.p0.items()
                    if role_of(cmd, pid) not in ("other", "ray_idle_workers", "ray_daemons")}

    def stop(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        p1 = _procs()
        roles: Counter[str] = Counter()
        procs = []
        for pid, (jiffies, cmd) in p1.items():
            used = (jiffies - self.p0[pid][0]) if pid in self.p0 else jiffies
            cores = used / HZ / elapsed
            if cores <= 0:
                continue
            role = role_of(cmd, pid)
            roles[role] += cores
            procs.append((cores, pid, role, cmd[:90]))
        procs.sort(reverse=True)
        busy = []
        for cores, pid, role, cmd in procs[:8]:
            if cores < 0.2 or pid not in self.th0:
                continue
            before, after = self.th0[pid], _threads(pid)
            threads = sorted(((after[t][0] - before.get(t, (0, ""))[0]) / HZ / elapsed, after[t][1]) for t in after)
            busy.append({"pid": pid, "role": role, "cores": round(cores, 3), "cmd": cmd,
                         "threads": [[name, round(c, 3)] for c, name in reversed(threads[-5:]) if c >= 0.02]})
        return {"seconds": round(elapsed, 2), "cores_by_role": {k: round(v, 3) for k, v in roles.most_common()},
                "top_processes": [[round(c, 3), role, cmd] for c, _, role, cmd in procs[:12]], "busy": busy}


def pids_by_role() -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for pid, (_, cmd) in _procs().items():
        out.setdefault(role_of(cmd, pid), []).append(pid)
    return out


# ------------------------------------------------------------------------------- the engine, by handle


def _engine_call(handle: Any, body: dict[str, Any]) -> Any:
    """``generate`` as the gateway calls it: typed ``EngineRequest`` (since 1a21438) or (kind, body, usage)."""
    from arks_ray.engines import protocol

    if hasattr(protocol, "EngineRequest"):
        return handle.remote(protocol.EngineRequest("chat", body, False))
    return handle.remote("chat", protocol.RequestBody(body), False)  # type: ignore[attr-defined]


async def _one_by_handle(handle: Any, body: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    ttft, items, events, tokens, usage = None, 0, 0, 0, None
    async for item in _engine_call(handle, body):
        items += 1
        usage = getattr(item, "usage", None) or usage  # the Final item's: an event may carry several tokens
        text = item if isinstance(item, str) else getattr(item, "text", None)
        if not isinstance(text, str):
            continue
        for event in text.split("\n\n"):
            if not event.startswith("data: {"):
                continue
            events += 1
            if '"content":"' in event and '"content":""' not in event:
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - started
    if isinstance(usage, dict) and usage.get("completion_tokens"):
        tokens = int(usage["completion_tokens"])
    return {"ok": tokens > 0, "ttft": ttft or 0.0, "latency": time.perf_counter() - started, "items": items,
            "events": events, "tokens": tokens}


async def handle_load(app: str, bodies: list[dict[str, Any]], concurrency: int) -> tuple[float, list[dict[str, Any]]]:
    """Stream ``bodies`` through the engine app's handle (``generate``), ``concurrency`` at a time."""
    from ray import serve

    handle = serve.get_app_handle(app).options(stream=True, method_name="generate")
    queue = list(reversed(bodies))
    results: list[dict[str, Any]] = []

    async def worker() -> None:
        while queue:
            results.append(await _one_by_handle(handle, queue.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, results


# ------------------------------------------------------------------------------- the gateway's own view


def _unix(iso: str) -> float:
    """The access log's ``time`` (UTC, ``2026-12-02T23:01:02.345Z``) as Unix seconds."""
    import calendar

    whole, _, millis = iso.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis or 0) / 1000


def gateway_view(started_unix: float, ended_unix: float, results: list[dict[str, Any]] | None = None,
                 logs: Path = Path("/tmp/ray/session_latest/logs")) -> dict[str, Any] | None:
    """p50/p90 of the access log's ``ttft_ms`` and ``gateway_ms`` for the requests the gateway replicas
    (found by process) started between the two times; None when no gateway line is found.

    With the client's ``results`` (each with the ``id`` it sent as ``X-Request-Id`` and its ``sent_unix``),
    each request's TTFT is also split where the gateway saw it: ``in`` from the client's send to the gateway
    taking it (the Serve proxy and the replica's ASGI layer), the gateway's own TTFT, and ``out`` from the first
    engine output at the gateway to the first token at the client (the same hops back)."""
    pids = pids_by_role().get("gateway", [])
    ttft: list[float] = []
    own: list[float] = []
    sent = {r["id"]: r for r in results or [] if r.get("ok") and r.get("id")}
    inbound: list[float] = []
    outbound: list[float] = []
    for pid in pids:
        for path in logs.glob(f"worker-*-{pid}.out"):
            for line in path.read_text(errors="replace").splitlines():
                if not line.startswith("{") or '"ttft_ms"' not in line:
                    continue
                try:
                    entry = json.loads(line)
                    at = _unix(entry["time"])
                except (ValueError, KeyError):
                    continue
                if started_unix - 0.5 <= at <= ended_unix and entry.get("ttft_ms") is not None:
                    ttft.append(float(entry["ttft_ms"]))
                    own.append(float(entry["gateway_ms"]))
                    mine = sent.get(entry.get("client_request_id", ""))
                    if mine is not None:
                        inbound.append((at - mine["sent_unix"]) * 1000)
                        outbound.append((mine["sent_unix"] + mine["ttft"] - at) * 1000 - float(entry["ttft_ms"]))
    if not ttft:
        return None
    from arks_ray.autoscaling.replica import percentile  # the client's percentiles are computed the same way

    split = (("in", inbound), ("out", outbound)) if inbound else ()
    return {"requests": len(ttft), "matched": len(inbound),
            **{f"{name}_p{q}_ms": round(percentile(values, q), 1)
               for name, values in (("ttft", ttft), ("gateway", own), *split) for q in (50, 90)}}


# --------------------------------------------------------------------------------------------- py-spy


def start_profiles(py_spy: str, pids: dict[str, int], seconds: int, out: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for role, pid in pids.items():
        cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200", "--format", "raw",
               "--nonblocking", "--threads", "--output", str(out / f"pyspy-{role}.txt")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    return procs


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        by_thread[frames[0][:60]] += n
        own[frames[-1][:110]] += n
        for f in set(frames[1:]):
            incl[f[:110]] += n
    share = (lambda c: [[k, round(v / total, 3)] for k, v in c.most_common(top)]) if total else (lambda c: [])
    return {"samples": total, "threads": share(by_thread), "self": share(own), "inclusive": share(incl)}


def dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))


_SERVE_LINE = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")


def _serve_events(path: Path) -> list[tuple[float, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = _SERVE_LINE.match(line)
        if m:
            at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((at, m.group(2)))
    return out


def latest_logs() -> Path:
    """This machine's newest Ray session's logs (``session_latest`` may point at a session deleted since)."""
    latest = Path("/tmp/ray/session_latest/logs")
    if latest.exists():
        return latest
    sessions = sorted(Path("/tmp/ray").glob("session_2*/logs"))
    return sessions[-1] if sessions else latest


def startup_timeline(app: str, logs: Path | None = None) -> list[dict[str, float]]:
    """Each replica the app started, in order: seconds spent in each stage of its start, from Serve's logs
    (``build_s`` only for the first: Serve's build task, which imports the app's code and Ray's LLM
    builder; ``process_s``: from Serve starting the replica to its ``__init__`` running, i.e. the worker
    process, its imports and the unpickled arguments; ``init_s``: the ``__init__``; ``noticed_s``: until
    Serve's controller saw it ready; ``engine_core_s``: the EngineCore process's start and imports, read off the
    replica's worker log by ``engine_core_s``)."""
    logs = logs or latest_logs()
    serve_logs = logs / "serve"
    controller = [e for f in sorted(serve_logs.glob("controller_[0-9]*.log")) for e in _serve_events(f)]
    deployed = next((at for at, msg in controller if msg.endswith(f"Deploying new app '{app}'.")), None)
    built = next((at for at, msg in controller if f"Imported and built app '{app}' successfully" in msg), None)
    replicas = []
    for at, msg in controller:
        m = re.search(r"Starting Replica\(id='(\w+)', deployment='[^']*', app='" + re.escape(app) + "'", msg)
        if not m:
            continue
        rid = m.group(1)
        stages: dict[str, float] = {}
        if not replicas and deployed and built:
            stages["build_s"] = round(built - deployed, 1)
        ready = next((t for t, msg2 in controller if f"Replica(id='{rid}'" in msg2 and "started successfully" in msg2),
                     None)
        own = [e for f in serve_logs.glob(f"replica_{app}_*_{rid}.log") for e in _serve_events(f)]
        began = next((t for t, msg2 in own if "Started initializing replica" in msg2), None)
        ended = next((t for t, msg2 in own if "Finished initializing replica" in msg2), None)
        if began:
            stages["process_s"] = round(began - at, 1)
        if began and ended:
            stages["init_s"] = round(ended - began, 1)
        elif began and ready:  # the engine's own logging set-up can cut the replica's log short: up to ready
            stages["init_s"] = round(ready - began, 1)
        if ended and ready:
            stages["noticed_s"] = round(ready - ended, 1)
        replicas.append(stages)
    # The replicas' own worker logs (their EngineCore's lines among them), in the order they were started.
    workers = sorted((f for f in logs.glob("worker-*.out") if f":actor_name:ServeReplica:{app}:" in _head(f)),
                     key=lambda f: f.stat().st_ctime)
    for stages, worker in zip(replicas, workers, strict=False):
        core = engine_core_s(worker)
        if core is not None:
            stages["engine_core_s"] = core
    return replicas


_VLLM_LINE = re.compile(r"^(?:\((\w+) pid=\d+\) )?(?:DEBUG|INFO|WARNING|ERROR) (\d\d-\d\d \d\d:\d\d:\d\d) (.*)$")


def _head(path: Path, size: int = 500) -> str:
    with path.open(errors="replace") as f:
        return f.read(size)


def _vllm_events(log: Path) -> list[tuple[float, str, str]]:
    """vLLM's log lines (``(EngineCore pid=7) INFO 12-04 05:37:08 [core.py:133] ...``; in a Ray worker's own log,
    without the process) in this file: (when, which process or "", message). vLLM's stamps have no year and
    whole seconds: the year is this one."""
    year = datetime.datetime.now().year
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = _VLLM_LINE.search(line)
        if m:
            at = datetime.datetime.strptime(f"{year}-{m.group(2)}", "%Y-%m-%d %H:%M:%S").timestamp()
            out.append((at, m.group(1) or "", m.group(3)))
    return out


def engine_core_s(log: Path) -> float | None:
    """A log holding vLLM's (``vllm serve``'s, or an engine replica's worker log): seconds from its last line
    before the EngineCore's first to that one, i.e. the EngineCore process's start and imports (about 0 when
    forked, an import of vLLM when spawned), in whole seconds."""
    events = _vllm_events(log)
    core = next((i for i, (_, name, _) in enumerate(events) if name.startswith("EngineCore")), None)
    before = [at for at, name, _ in events[:core] if not name.startswith("EngineCore")] if core is not None else []
    return round(events[core][0] - before[-1], 1) if core is not None and before else None


# ----------------------------------------------------------------------------------------- Serve waits

WAITS = {"ray_serve_event_loop_scheduling_latency_ms_bucket{": "loop lag",
         "ray_serve_request_router_fulfillment_time_ms_bucket{": "router wait"}
"""Ray Serve's own histograms read by ``serve_waits``: how late each event loop woke up, and how long a request
waited in a router (the proxy's, or a handle's) before it was assigned a replica."""
WAITS_ENV = {"RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "0.05", "RAY_metrics_report_interval_ms": "1000"}
"""Serve samples each loop every 5 s and Ray reports metrics every 10 s by default: too seldom for a 10 s load."""


def serve_waits(urls: list[str] | None = None) -> dict[str, dict[float, float]]:
    """Cumulative counts of ``WAITS`` now, per histogram and place: ``loop lag proxy``, ``loop lag <deployment>``
    (its replicas summed), ``router wait <deployment> (<handle source>)``, from every live node's metrics page."""
    import httpx

    if urls is None:
        import ray

        urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes()
                if n.get("Alive") and n.get("MetricsExportPort")]
    out: dict[str, dict[float, float]] = {}
    for url in urls:
        for line in httpx.get(url, timeout=10).text.splitlines():
            what = next((name for prefix, name in WAITS.items() if line.startswith(prefix)), None)
            if what is None:
                continue
            labels, _, value = line.rpartition(" ")
            tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            where = tags.get("deployment") or tags.get("component", "?")
            if tags.get("loop_type", "main") != "main":
                where += f" ({tags['loop_type']})"
            if tags.get("handle_source"):
                where += f" ({tags['handle_source'].lower()})"
            edge = float("inf") if tags.get("le") == "+Inf" else float(tags.get("le", "inf"))
            counts = out.setdefault(f"{what} {where}", {})
            counts[edge] = counts.get(edge, 0.0) + float(value)
    return out


def waits_between(before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]) -> dict[str, Any]:
    """Per histogram and place, the samples taken between two reads and the histogram edges (ms) that hold their
    p50, p90 and p99: a sample at or below the edge, above the one before."""
    out: dict[str, Any] = {}
    for key, counts in sorted(after.items()):
        prior = before.get(key, {})
        cumulative = sorted((edge, count - prior.get(edge, 0.0)) for edge, count in counts.items())
        total = cumulative[-1][1] if cumulative else 0.0
        if total <= 0:
            continue

        def edge_of(q: float, cumulative: list[tuple[float, float]] = cumulative, total: float = total) -> float:
            return next(edge for edge, count in cumulative if count >= q * total)

        out[key] = {"samples": int(total), "p50_le_ms": edge_of(0.5), "p90_le_ms": edge_of(0.9),
                    "p99_le_ms": edge_of(0.99)}
    return out
