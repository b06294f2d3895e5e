"""LoRA adapters per tenant, without Ray: the spec, its render (engine flags, the adapter table in the engine
deployment's user_config, one gateway endpoint per adapter), the replica's adapter table, and the
generated tiny adapter and embedding model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from arks_ray.api import load_documents
from arks_ray.api.application import ArksApplicationSpec
from arks_ray.local.tinyfamily import (
    EMBEDDING_DIM,
    LORA_RANK,
    ensure_tiny_embedding_model,
    ensure_tiny_lora,
)
from arks_ray.render import Rendered, RenderOptions, render_namespace
from deployments.lora import AdapterTable, UnknownAdapter
from tests.support.keys import TEST_KEYS

PVC = {"pvc": {"name": "weights", "spec": {"accessModes": ["ReadWriteMany"]}}}
INSTANCE = {"resources": {"limits": {"nvidia.com/gpu": 1}}}


def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "arks.ai/v1", "kind": kind, "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def objects(adapters: list[dict[str, Any]], **lora: Any) -> list[dict[str, Any]]:
    return [
        doc("ArksModel", "base", {"model": "org/base", "storage": PVC}),
        doc("ArksModel", "sql-lora", {"model": "org/sql-lora", "storage": PVC, "source": {"huggingface": {}}}),
        doc("ArksModel", "elsewhere", {"model": "org/other-lora", "storage": {"pvc": {"spec": {}}}}),
        doc("ArksApplication", "chat", {"model": {"name": "base"}, "servedModelName": "chat", "instanceSpec": INSTANCE,
                                        "lora": {"adapters": adapters, **lora}}),
        doc("ArksEndpoint", "chat", {}),
        doc("ArksToken", "tenant", {"token": "sk-tenant", "qos": [
            {"arksEndpoint": {"name": "chat:sql"}, "rateLimits": [{"type": "rpm", "value": 5}]}]}),
    ]


def render(docs: list[dict[str, Any]]) -> Rendered:
    loaded = load_documents(docs)
    assert not loaded.errors, loaded.errors
    return render_namespace(loaded.objects, "default", options=RenderOptions(token_keys=TEST_KEYS))


def engine(rendered: Rendered) -> dict[str, Any]:
    apps = rendered.serve_config["applications"]
    found: dict[str, Any] = next(a for a in apps if a["name"] == "chat")
    return found


def gateway(rendered: Rendered) -> dict[str, Any]:
    apps = rendered.serve_config["applications"]
    config: dict[str, Any] = next(a for a in apps if a["name"] == "gateway")["deployments"][0]["user_config"]
    return config


def test_lora_turns_on_vllm_lora_and_ray_multiplexing() -> None:
    app = engine(render(objects([{"name": "sql", "model": {"name": "sql-lora"}}], maxRank=32)))
    llm = app["args"]["llm_config"]
    assert {k: llm["engine_kwargs"][k] for k in ("enable_lora", "max_lora_rank", "max_loras")} == {
        "enable_lora": True, "max_lora_rank": 32, "max_loras": 4}
    assert llm["lora_config"] == {"max_num_adapters_per_replica": 4}
    # The table is the engine deployment's user_config, under the name Ray's builder gives it.
    assert app["deployments"] == [{"name": "arks-engine:chat",
                                   "user_config": {"adapters": {"chat:sql": "/models/models/default/sql-lora"}}}]


def test_adding_or_removing_an_adapter_changes_only_the_user_config() -> None:
    """Serve restarts replicas when an app's args change, and only reconfigures them when a deployment's
    user_config does: the adapter list must live in the latter."""
    one = engine(render(objects([{"name": "sql", "model": {"name": "sql-lora"}}])))
    none = engine(render(objects([])))
    assert one["args"] == none["args"]
    assert one.get("runtime_env") == none.get("runtime_env")
    assert none["deployments"][0]["user_config"] == {"adapters": {}}


def test_each_adapter_is_an_endpoint_granted_and_limited_on_its_own() -> None:
    config = gateway(render(objects([{"name": "sql", "model": {"name": "sql-lora"}}])))
    endpoints = {e["name"]: e for e in config["endpoints"]}
    assert [b.get("adapter") for b in endpoints["chat"]["backends"]] == [None]
    assert [(b["name"], b["weight"], b["adapter"]) for b in endpoints["chat:sql"]["backends"]] == [
        ("chat", 1, "chat:sql")]
    grants = config["tokens"][0]["grants"]
    assert grants == [{"endpoint": "chat:sql", "rate_limits": [{"type": "rpm", "value": 5}], "quota": None}]


def test_an_adapter_that_cannot_be_served_is_left_out_with_a_warning() -> None:
    rendered = render(objects([{"name": "gone", "model": {"name": "missing"}},
                               {"name": "other", "model": {"name": "elsewhere"}},
                               {"name": "sql", "model": {"name": "sql-lora"}}]))
    assert engine(rendered)["deployments"][0]["user_config"]["adapters"] == {
        "chat:sql": "/models/models/default/sql-lora"}
    messages = [(p.path, p.severity, p.message) for p in rendered.problems]
    assert any(p == "spec.lora.adapters[0].model.name" and "not found" in m for p, _, m in messages)
    assert any(p == "spec.lora.adapters[1].model.name" and "PVC" in m for p, _, m in messages)
    assert all(severity == "warning" for _, severity, _ in messages)
    # The gateway still lists the adapters the spec names; a replica refuses one it was not given.
    assert {e["name"] for e in gateway(rendered)["endpoints"]} == {"chat", "chat:gone", "chat:other", "chat:sql"}


@pytest.mark.parametrize(("lora", "runtime", "message"), [
    ({"adapters": [{"name": "a", "model": {"name": "m"}}, {"name": "a", "model": {"name": "n"}}]}, "vllm", "duplicate"),
    ({"adapters": [{"name": "Bad:name", "model": {"name": "m"}}]}, "vllm", "pattern"),
    ({"adapters": []}, "sglang", "runtime vllm only"),
])
def test_lora_spec_is_checked(lora: dict[str, Any], runtime: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ArksApplicationSpec.model_validate({"model": {"name": "m"}, "instanceSpec": {}, "runtime": runtime,
                                            "lora": lora})


def test_replica_adapter_table_follows_the_user_config() -> None:
    table = AdapterTable()
    table.update({"stream_interval_ms": 10})  # another setting only: no change
    with pytest.raises(UnknownAdapter):
        table.path("chat:sql")
    table.update({"adapters": {"chat:sql": "/a"}})
    assert table.path("chat:sql") == "/a"
    table.update({"adapters": {}})
    with pytest.raises(UnknownAdapter, match="not served"):
        table.path("chat:sql")


def test_generated_adapter_and_embedding_model(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    lora = ensure_tiny_lora(tmp_path)
    assert ensure_tiny_lora(tmp_path) == lora
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == LORA_RANK
    weights = load_file(str(lora / "adapter_model.safetensors"))
    a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert tuple(a.shape) == (LORA_RANK, EMBEDDING_DIM)
    assert tuple(b.shape) == (EMBEDDING_DIM, LORA_RANK)
    assert float(b.abs().sum()) > 0  # unlike a fresh PEFT adapter, it changes the base model's outputs
    again = ensure_tiny_lora(tmp_path / "other")
    assert (again / "adapter_model.safetensors").read_bytes() == (lora / "adapter_model.safetensors").read_bytes()

    embed = ensure_tiny_embedding_model(tmp_path)
    assert json.loads((embed / "config.json").read_text())["architectures"] == ["Qwen2Model"]
    assert json.loads((embed / "config.json").read_text())["hidden_size"] == EMBEDDING_DIM
