"""arks-ray's vLLM general plugin: registered where vLLM looks for it, and safe wherever it runs.

Its effect (no SIGILL in vLLM CPU's AMX attention) is checked by the end-to-end modules that serve bf16
engines on this AMX machine (``tests/e2e/test_openai_surface.py``'s embeddings, the multi-node solo stream),
which fail without it in most runs."""

from __future__ import annotations

import types
from importlib.metadata import entry_points

import pytest

from arks_ray.engines import vllm_plugin


def test_vllm_finds_the_plugin_in_its_general_plugins_group() -> None:
    (ours,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "arks_ray"]
    assert ours.load() is vllm_plugin.prepare


def test_the_amx_state_is_asked_for_only_where_the_cpu_has_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    asked: list[bool] = []
    monkeypatch.setattr(vllm_plugin.platform, "system", lambda: "Linux")
    monkeypatch.setattr(vllm_plugin.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: asked.append(True) or True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert vllm_plugin.request_amx_state() is False
    assert asked == []
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert vllm_plugin.request_amx_state() is True
    assert asked == [True]
    monkeypatch.setattr(vllm_plugin.platform, "machine", lambda: "aarch64")
    assert vllm_plugin.request_amx_state() is False
    assert asked == [True]


def test_the_plugin_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin that raises would stop the engine from starting: a torch without the call is no AMX."""
    import torch

    monkeypatch.setattr(vllm_plugin.platform, "system", lambda: "Linux")
    monkeypatch.setattr(vllm_plugin.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch, "cpu", types.SimpleNamespace())
    assert vllm_plugin.request_amx_state() is False
    vllm_plugin.prepare()
