"""Local Ray + Serve stacks for the end-to-end suites: plans from the demo manifest, and the shared stack.

``SharedStack`` is the one stack the e2e modules share (``tests/e2e/conftest.py`` hands it out as the
``arks_stack`` fixture): one local Ray, one Serve deployment of the demo objects (the ``tiny`` vLLM app,
the ``tiny`` endpoint, the demo token) behind a gateway of two replicas that count in a real Redis. A
module adds what it needs with ``extended`` (its apps, endpoints, tokens, quotas, gateway settings) and
gets the base back when it leaves; ``apply`` changes the running config inside a module the same way.
Objects are merged by kind, namespace and name, so an extra object replaces the base one of that name.

``make_plan`` and ``bring_up`` serve modules and benchmarks that run a stack of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from arks_ray.api.digests import TOKEN_KEY_ENV, TOKEN_KEY_NEXT_ENV
from arks_ray.api.loading import load_yaml
from arks_ray.local import runner
from arks_ray.render.options import Ingress
from tests.support.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs/examples/local-demo.yaml"
DEMO_TOKEN = "sk-arks-demo-local-only"
# The demo app's engine on CPU, as the lines of an ArksApplication spec (model, args, env), for test apps.
TINY_ENGINE = """  model: {name: tiny-qwen2}
  runtimeCommonArgs: [--dtype bfloat16, --max-model-len 2048, --gpu-memory-utilization 0.1, --enforce-eager]
  instanceSpec:
    env: [{name: VLLM_CPU_KVCACHE_SPACE, value: "1"}, {name: HF_HUB_OFFLINE, value: "1"}]
"""


def demo_without(*kinds: str) -> str:
    """The demo manifest without its documents of these kinds (to replace them with a test's own)."""
    docs = DEMO.read_text().split("\n---\n")
    return "\n---\n".join(d for d in docs if not any(f"kind: {k}\n" in d for k in kinds))


def make_plan(extra: str, port: int, *, base: str | None = None, **kwargs: Any) -> runner.LocalPlan:
    """The demo objects (or ``base``) plus ``extra`` YAML, planned for a local run on ``port``; one gateway replica
    unless ``gateway_replicas`` says otherwise (``up``'s default depends on the machine's cores)."""
    kwargs.setdefault("gateway_replicas", 1)
    loaded = load_yaml((DEMO.read_text() if base is None else base) + "\n---\n" + extra)
    assert not loaded.errors, loaded.errors
    runner.ensure_local_models(loaded)
    with installation_key():
        return runner.plan(loaded, "default", port, **kwargs)


def bring_up(plan: runner.LocalPlan, timeout_s: float = 600) -> None:
    with installation_key():
        runner.start_ray(plan.num_cpus, plan.resources)
    runner.deploy(plan.serve_config)
    runner.wait_ready(["gateway", *plan.engine_apps], timeout_s=timeout_s, progress=print)


def merge_objects(base: str, extra: str) -> str:
    """``base`` then ``extra`` as one manifest; an extra object replaces the base one of its kind and name."""

    def docs(text: str) -> list[tuple[tuple[str, str, str], str]]:
        out = []
        for doc in re.split(r"^---[ \t]*$", text, flags=re.MULTILINE):
            obj = yaml.safe_load(doc)
            if isinstance(obj, dict):
                meta = obj.get("metadata") or {}
                out.append(((obj.get("kind", ""), meta.get("namespace", "default"), meta.get("name", "")), doc))
        return out

    merged = dict(docs(base))
    merged.update(docs(extra))  # a replaced object keeps its place; a new one goes last
    return "\n---\n".join(d.strip("\n") for d in merged.values()) + "\n"


@contextlib.contextmanager
def installation_key() -> Iterator[None]:
    """Renders and ``ray start`` with the local installation's key file, whatever the test's environment says.

    ``tests/conftest.py`` puts a namespace key into every test's environment (for in-process gateways), and
    the local runner reads that variable as the installation key: a stack brought up in a fixture and
    redeployed from a test would otherwise digest tokens with a key its gateway does not hold.
    """
    saved = {k: os.environ.pop(k) for k in (TOKEN_KEY_ENV, TOKEN_KEY_NEXT_ENV) if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class SharedStack:
    """One local Ray and one Serve deployment for every e2e module that asks for ``arks_stack``.

    Base: the demo manifest, gateway settings ``BASE_SETTINGS`` plus the Redis URL, two gateway replicas.
    ``url`` is the gateway's base URL (``/v1/...`` below it), ``port`` its port, ``redis`` the counter
    store (a module may stop and restart it, on the same port), ``plan`` what runs now.
    """

    # Backend names in x-arks-backend, one health check a second, a fixed backend-choice seed: what the
    # routing module needs, harmless to the others (set for all, so no module restarts the gateway for them).
    BASE_SETTINGS: dict[str, Any] = {"backend_header": True, "health_check_interval_s": 1, "seed": 7}
    GATEWAY_REPLICAS = 2
    # Logical CPUs of the head: the base, plus the largest module (two autoscaled replicas and a second app).
    HEAD_CPUS = 12
    READY_TIMEOUT_S = 600

    def __init__(self, ingress: Ingress | None = None) -> None:
        # ARKS_E2E_INGRESS=haproxy runs the shared-stack modules behind Ray's HAProxy ingress instead of Serve's proxy.
        self.ingress: Ingress = ingress or ("haproxy" if os.environ.get("ARKS_E2E_INGRESS") == "haproxy" else "serve")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = DEMO_TOKEN
        self.redis: RedisServer | None = None
        self.plan: runner.LocalPlan | None = None
        self.offered: set[str] = set()  # custom resources the running Ray offers (its raylets)
        self.raylets = 0
        self.setup_s: dict[str, float] = {}  # what each up/apply took, for the report

    @property
    def is_up(self) -> bool:
        return self.plan is not None

    def render(self, extra: str = "", settings: dict[str, Any] | None = None) -> runner.LocalPlan:
        """The plan of the base plus ``extra`` objects and ``settings`` (over the base settings)."""
        assert self.redis is not None, "the shared stack is not up"
        loaded = load_yaml(merge_objects(DEMO.read_text(), extra))
        assert not loaded.errors, loaded.errors
        runner.ensure_local_models(loaded)
        gateway = {**self.BASE_SETTINGS, "redis_url": self.redis.url, **(settings or {})}
        with installation_key():
            return runner.plan(loaded, "default", self.port, gateway_settings=gateway,
                               gateway_replicas=self.GATEWAY_REPLICAS, ingress=self.ingress)

    def up(self) -> SharedStack:
        """Start Redis and Ray (stopping a Ray left over on this machine) and deploy the base."""
        if self.is_up:
            return self
        started = time.monotonic()
        if runner.ray_running():
            runner.down()
        self.redis = RedisServer().start()
        plan = self.render()
        with installation_key():
            runner.start_ray(max(self.HEAD_CPUS, plan.num_cpus), plan.resources, ingress=self.ingress)
        self.offered = set(plan.resources)
        self._deploy(plan)
        self.setup_s["base"] = time.monotonic() - started
        print(f"shared stack up in {self.setup_s['base']:.1f}s (Ray, the gateway and the tiny app; "
              f"ingress {self.ingress})")
        return self

    def apply(self, extra: str = "", settings: dict[str, Any] | None = None) -> runner.LocalPlan:
        """Deploy the base plus ``extra`` with ``settings``, and wait until every app in it runs.

        Apps left out stop; apps whose config is unchanged keep running (a change to tokens, endpoints
        or quotas only reconfigures the gateway's replicas; a change to settings replaces them).
        """
        plan = self.render(extra, settings)
        self._deploy(plan)
        return plan

    def restore(self) -> None:
        """Back to the base (what a module must leave behind)."""
        self.apply()

    @contextlib.contextmanager
    def extended(self, extra: str = "", settings: dict[str, Any] | None = None,
                 label: str = "module") -> Iterator[runner.LocalPlan]:
        """The base plus a module's own objects and settings while in the block; the base afterwards."""
        started = time.monotonic()
        plan = self.apply(extra, settings)
        self.setup_s[label] = time.monotonic() - started
        print(f"shared stack extended for {label} in {self.setup_s[label]:.1f}s")
        try:
            yield plan
        finally:
            self.restore()

    def down(self) -> None:
        """Delete the apps, stop every raylet of this machine and Redis."""
        if self.plan is not None:
            runner.down()
            print("shared stack down")
        self.plan = None
        self.offered = set()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def _deploy(self, plan: runner.LocalPlan) -> None:
        self._offer(plan.resources)
        before = set(self.plan.engine_apps) if self.plan is not None else set()
        runner.deploy(plan.serve_config)
        self.plan = plan
        runner.wait_ready(["gateway", *plan.engine_apps], timeout_s=self.READY_TIMEOUT_S, progress=print)
        gone = before - set(plan.engine_apps)
        deadline = time.monotonic() + 120
        while gone & set(runner.serve_status()):  # free their CPU and memory before the next module starts
            assert time.monotonic() < deadline, f"apps {sorted(gone)} were not deleted within 120s"
            time.sleep(0.5)

    def _offer(self, resources: dict[str, float]) -> None:
        """Worker-group resources the running Ray lacks come from one more raylet, as a new KubeRay pod would."""
        missing = {name: amount for name, amount in resources.items() if name not in self.offered}
        if not missing:
            return
        address = Path("/tmp/ray/ray_current_cluster").read_text().strip()
        self.raylets += 1
        cmd = [runner._ray_bin(), "start", f"--address={address}", "--num-cpus=8", "--num-gpus=0",
               f"--resources={json.dumps(missing)}", "--disable-usage-stats"]
        with installation_key():
            # The head's Serve settings too (runner.ray_env), as every node of a rendered cluster has them.
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  env=runner.ray_env({}, self.ingress))
        if proc.returncode != 0:
            raise RuntimeError(f"adding a raylet for {sorted(missing)} failed:\n{proc.stdout}\n{proc.stderr}")
        self.offered |= set(missing)
