"""Build local plans from the demo manifest plus extra objects, for the end-to-end suites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arks_ray.api.loading import load_yaml
from arks_ray.local import runner

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs/examples/local-demo.yaml"
DEMO_TOKEN = "sk-arks-demo-local-only"


def make_plan(extra: str, port: int, **kwargs: Any) -> runner.LocalPlan:
    """The demo objects plus ``extra`` YAML, planned for a local run on ``port``."""
    loaded = load_yaml(DEMO.read_text() + "\n---\n" + extra)
    assert not loaded.errors, loaded.errors
    runner.ensure_local_models(loaded)
    return runner.plan(loaded, "default", port, **kwargs)


def bring_up(plan: runner.LocalPlan, timeout_s: float = 600) -> None:
    runner.start_ray(plan.num_cpus, plan.resources)
    runner.deploy(plan.serve_config)
    runner.wait_ready(["gateway", *plan.engine_apps], timeout_s=timeout_s, progress=print)
