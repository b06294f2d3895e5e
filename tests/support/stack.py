"""Build local plans from the demo manifest plus extra objects, for the end-to-end suites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arks_ray.api.loading import load_yaml
from arks_ray.local import runner

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
    """The demo objects (or ``base``) plus ``extra`` YAML, planned for a local run on ``port``."""
    loaded = load_yaml((DEMO.read_text() if base is None else base) + "\n---\n" + extra)
    assert not loaded.errors, loaded.errors
    runner.ensure_local_models(loaded)
    return runner.plan(loaded, "default", port, **kwargs)


def bring_up(plan: runner.LocalPlan, timeout_s: float = 600) -> None:
    runner.start_ray(plan.num_cpus, plan.resources)
    runner.deploy(plan.serve_config)
    runner.wait_ready(["gateway", *plan.engine_apps], timeout_s=timeout_s, progress=print)
