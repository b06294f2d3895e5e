"""The vLLM engine deployment built without vLLM (``deployments.engine_deployment``), against Ray's own builder.

Ray's ``build_llm_deployment`` runs here beside ours on the same ``LLMConfig``s (vLLM's CPU build is installed)
and every option must come out equal: name, Serve config, actor options, placement group. A change in Ray's
builder fails this file. Serve's build task then imports neither vLLM nor ``ray.serve.llm``, nor runs torch or
transformers: checked in a fresh interpreter, for the rendered example apps.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from arks_ray.api import load_documents
from arks_ray.engines.vllm_server import FRONTEND_KEY, VLLM_SERVER
from arks_ray.render import RenderOptions, render_namespace
from deployments.engines import EngineAppArgs, build_app
from tests.support.keys import TEST_KEYS

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "examples"
RUNTIME_ENV = {"env_vars": {"JOB": "1"}, "py_modules": ["/job"]}


def rendered_engine_args(*names: str) -> list[dict[str, Any]]:
    """The ``args`` of every vLLM engine app the example manifests render to."""
    out = []
    for name in names:
        loaded = load_documents(list(yaml.safe_load_all((EXAMPLES / f"{name}.yaml").read_text())))
        namespaces = {getattr(o.metadata, "namespace", None) or "default" for o in loaded.objects}
        for ns in sorted(namespaces):
            rendered = render_namespace(loaded.objects, ns, options=RenderOptions(token_keys=TEST_KEYS))
            config = rendered.serve_config or {}
            out += [a["args"] for a in config.get("applications", [])
                    if a["import_path"] == "deployments.engines:build_app" and a["args"]["runtime"] == "vllm"]
    assert out, names
    return out


def args(llm_config: dict[str, Any]) -> dict[str, Any]:
    return {"name": "chat-a", "runtime": "vllm", "llm_config": llm_config}


def base(placement: dict[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    config = {"model_loading_config": {"model_id": "org/m-1.5", "model_source": "/models/m"},
              "engine_kwargs": {"enforce_eager": True},
              "placement_group_config": placement or {"bundles": [{"GPU": 1, "arks-g": 1}], "strategy": "STRICT_PACK"},
              "deployment_config": {"num_replicas": 1}}
    config.update(copy.deepcopy(over))
    return config


TWO_GPUS = {"bundles": [{"GPU": 1, "arks-g": 1}, {"GPU": 1, "arks-g": 1}], "strategy": "SPREAD"}
CASES = {
    "one GPU, in process": base(),
    "one GPU, Ray executor": base(engine_kwargs={"distributed_executor_backend": "ray"}),
    "TP 2 on an accelerator type": base(TWO_GPUS, engine_kwargs={"tensor_parallel_size": 2},
                                        accelerator_type="H100"),
    "CPU": base({"bundles": [{"CPU": 1.0, "arks-c": 1}]}),
    "no strategy": base({"bundles": [{"GPU": 1}]}),
    "actor options and runtime envs": base(
        deployment_config={"num_replicas": 2, "ray_actor_options": {
            "num_cpus": 2, "memory": 1000, "resources": {"r": 1}, "runtime_env": {"env_vars": {"A": "1"}}}},
        runtime_env={"env_vars": {"B": "2"}}),
    "autoscaling, SLO policy, a router": base(deployment_config={
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8,
                               "policy": {"policy_function": "deployments.autoscaling:SloAutoscalingPolicy"}},
        "max_ongoing_requests": 64,
        "request_router_config": {"request_router_class":
                                  "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"}}),
    "a name of its own": base(deployment_config={"num_replicas": 1, "name": "mine"}),
    "Ray LLM's defaults alone": base(deployment_config={}),
    "vLLM's server as frontend": base(experimental_configs={FRONTEND_KEY: VLLM_SERVER}),
}


@pytest.fixture
def job_runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both builders read the job's runtime_env; outside Ray that call would start one.
    import ray

    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(runtime_env=copy.deepcopy(RUNTIME_ENV)))


def view(app: Any) -> dict[str, Any]:
    """What Serve deploys of an Application's deployment, less the code reference."""
    deployment = app._bound_deployment
    replica = deployment._replica_config
    return {"name": deployment.name,
            "config": deployment._deployment_config.model_dump(exclude={"user_configured_option_names"}),
            "options set": sorted(deployment._deployment_config.user_configured_option_names),
            "ray_actor_options": replica.ray_actor_options,
            # as JSON: Serve hashes the placement this way for the deployment's version (1 and 1.0 differ there)
            "bundles": json.dumps(replica.placement_group_bundles, sort_keys=True),
            "strategy": replica.placement_group_strategy,
            "label selector": replica.placement_group_bundle_label_selector,
            "fallback": replica.placement_group_fallback_strategy,
            "per node": replica.max_replicas_per_node,
            "init_args": [type(a).__name__ for a in replica.init_args],
            "init_kwargs": {k: type(v).__name__ for k, v in replica.init_kwargs.items()}}


def rays_build(raw: dict[str, Any]) -> Any:
    """The app as Ray's builder makes it: ``build_vllm`` with ``engine_deployment.modelled`` answering no."""
    import deployments.engine_deployment as ours

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ours, "modelled", lambda config: False)
        return build_app(raw)


@pytest.mark.usefixtures("job_runtime_env")
@pytest.mark.parametrize("raw", [pytest.param(args(c), id=k) for k, c in CASES.items()] + [
    pytest.param(a, id=f"rendered {a['name']}") for a in rendered_engine_args("local-demo", "multi-app")])
def test_the_deployment_is_the_one_rays_builder_makes(raw: dict[str, Any]) -> None:
    from ray.serve._private.replica import _load_deployment_def_from_import_path
    from ray.serve._private.utils import _callable_uses_multiplexing

    from deployments.engine_deployment import modelled

    assert modelled(EngineAppArgs.model_validate(raw).ray_llm_config())
    ours, rays = build_app(raw), rays_build(raw)
    assert view(ours) == view(rays)
    # Both name the class for the replica to import (the fallback swaps Ray's class for the path).
    code = ours._bound_deployment.func_or_class
    assert code == rays._bound_deployment.func_or_class
    server = (raw["llm_config"].get("experimental_configs") or {}).get(FRONTEND_KEY) == VLLM_SERVER
    assert code == ("deployments.vllm_server.VLLMServerReplica" if server else "deployments.vllm_engine.ArksLLMServer")
    replica = _load_deployment_def_from_import_path(code)
    assert replica.__name__ == code.rpartition(".")[2]
    # Serve reads multiplexing off the code at build time, and finds none in a path: nor may the class hold any.
    assert not _callable_uses_multiplexing(replica)


def test_the_in_process_replica_still_holds_its_gpu(job_runtime_env: None) -> None:
    deployment = build_app(args(base()))._bound_deployment
    assert deployment._replica_config.ray_actor_options["num_gpus"] == 1
    assert deployment._replica_config.placement_group_bundles == [{"CPU": 1, "GPU": 1, "arks-g": 1}]


@pytest.mark.usefixtures("job_runtime_env")
@pytest.mark.parametrize("raw", [
    base({"bundle_per_worker": {"GPU": 1}}),
    base(accelerator_config={"kind": "tpu"}, placement_group_config={"bundles": [{"TPU": 1}]}),
    base(engine_kwargs={"kv_events_config": {"enable_kv_cache_events": True}}),
    base(deployment_config={"num_replicas": 1, "request_router_config": {
        "request_router_class": "ray.serve.llm.request_router:KVAwareRouter"}}),
], ids=["bundle per worker", "TPU", "KV events", "KV-aware router"])
def test_what_is_not_modelled_goes_rays_way(raw: dict[str, Any]) -> None:
    from deployments.engine_deployment import modelled

    assert not modelled(EngineAppArgs.model_validate(args(raw)).ray_llm_config())


def test_the_build_imports_neither_vllm_nor_ray_serve_llm_nor_runs_torch(tmp_path: Path) -> None:
    raws = rendered_engine_args("local-demo", "multi-app") + [args(c) for c in CASES.values()]
    (tmp_path / "apps.json").write_text(json.dumps(raws))
    script = (
        "import json, sys, types, ray\n"
        "ray.get_runtime_context = lambda: types.SimpleNamespace(runtime_env={})\n"
        "from deployments.engines import build_app\n"
        f"apps = [build_app(a) for a in json.load(open({str(tmp_path / 'apps.json')!r}))]\n"
        "heavy = lambda: sorted(m for m in sys.modules if m in ('vllm', 'torch._C', 'transformers.utils')\n"
        "                       or m.startswith(('vllm.', 'ray.serve.llm')))\n"
        "built = heavy()\n"
        # What Ray's modules took as torch and transformers still works, and imports them then.
        "from ray.llm._internal.common.utils import download_utils\n"
        "from ray.llm._internal.serve.core.configs import llm_config\n"
        "home = download_utils.torch.hub._get_torch_home()\n"
        "auto = llm_config.transformers.AutoConfig.__name__\n"
        "import torch\n"
        "print(json.dumps([built, heavy(), bool(home), auto, type(torch).__name__]))\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    built, used, home, auto, torch_type = json.loads(done.stdout.strip().splitlines()[-1])
    assert built == []
    assert used == ["torch._C", "transformers.utils"]
    assert home
    assert auto == "AutoConfig"
    assert torch_type == "module"


@pytest.fixture
def fake_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An importable module, ``arks_fake_heavy``, that counts its imports in ``IMPORTS``."""
    (tmp_path / "arks_fake_heavy.py").write_text(
        "import builtins\nbuiltins.ARKS_FAKE_IMPORTS = getattr(builtins, 'ARKS_FAKE_IMPORTS', 0) + 1\nVALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "arks_fake_heavy", raising=False)
    import builtins

    monkeypatch.setattr(builtins, "ARKS_FAKE_IMPORTS", 0, raising=False)
    yield "arks_fake_heavy"
    sys.modules.pop("arks_fake_heavy", None)


def test_a_deferred_import_runs_the_module_on_first_use_only(fake_module: str) -> None:
    import builtins
    import importlib

    from deployments.engines import deferred_imports

    with deferred_imports(fake_module, "arks_not_installed_anywhere"):
        taken = importlib.import_module(fake_module)
        assert builtins.ARKS_FAKE_IMPORTS == 0  # type: ignore[attr-defined]
        with pytest.raises(ImportError):  # not installed: the import fails as usual (Ray's try_import: None)
            importlib.import_module("arks_not_installed_anywhere")
    assert fake_module not in sys.modules  # after the block, an import is a usual one
    assert taken.VALUE == 42
    assert builtins.ARKS_FAKE_IMPORTS == 1  # type: ignore[attr-defined]
    assert importlib.import_module(fake_module).VALUE == 42
    assert builtins.ARKS_FAKE_IMPORTS == 1  # type: ignore[attr-defined]


def test_a_module_used_within_the_block_or_imported_before_is_the_real_one(fake_module: str) -> None:
    import builtins
    import importlib

    from deployments.engines import deferred_imports

    with deferred_imports(fake_module):
        assert importlib.import_module(fake_module).VALUE == 42
        real = sys.modules[fake_module]
        assert importlib.import_module(fake_module) is real
    assert sys.modules[fake_module] is real
    with deferred_imports(fake_module):
        assert importlib.import_module(fake_module) is real
    assert builtins.ARKS_FAKE_IMPORTS == 1  # type: ignore[attr-defined]


def test_the_prefix_cache_router_is_rays_public_one() -> None:
    """The renderer names the router by its own module; ``ray.serve.llm``'s public class adds nothing to it."""
    from ray._common.utils import import_attr
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter

    from arks_ray.render.serve_config import ROUTERS

    ours = import_attr(ROUTERS["prefixCache"])
    assert PrefixCacheAffinityRouter.__bases__ == (ours,)
    assert not [k for k in vars(PrefixCacheAffinityRouter) if not k.startswith("_")]


def test_the_llm_config_is_rays_public_one() -> None:
    """The build validates with ``LLMConfig``'s own module; ``ray.serve.llm``'s public class adds nothing to it."""
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig as Internal
    from ray.serve.llm import LLMConfig

    assert LLMConfig.__bases__ == (Internal,)
    assert LLMConfig.model_fields.keys() == Internal.model_fields.keys()
    assert not [k for k in vars(LLMConfig) if not k.startswith(("_", "model_"))]  # pydantic's own: model_*


@pytest.mark.usefixtures("job_runtime_env")
def test_the_server_replica_gets_the_engine_kwargs_rays_builder_adds() -> None:
    """A KV-aware router goes Ray's way, whose builder turns on the engine's KV events: the ``vllmServer``
    replica's own config is taken after that."""
    raw = base(deployment_config={"num_replicas": 1, "request_router_config": {
        "request_router_class": "ray.serve.llm.request_router:KVAwareRouter"}},
        experimental_configs={FRONTEND_KEY: VLLM_SERVER})
    deployment = build_app(args(raw))._bound_deployment
    assert deployment.func_or_class == "deployments.vllm_server.VLLMServerReplica"
    (config,) = deployment._replica_config.init_args
    assert "kv_events_config" in config.engine_kwargs
