"""``deployments.engines.build_app``: what it refuses, and that each refusal names the application."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.engines import build_app


def _args(runtime: str, llm_config: dict[str, Any]) -> dict[str, Any]:
    return {"name": "chat-a", "runtime": runtime, "llm_config": llm_config}


def test_args_the_renderer_never_writes_are_refused_naming_the_app() -> None:
    with pytest.raises(ValueError, match=r"^application chat-a: invalid engine app args"):
        build_app({"name": "chat-a", "runtime": "tgi", "llm_config": {}})
    with pytest.raises(ValueError, match=r"^application \?: invalid engine app args"):
        build_app({"llm_config": {}})


@pytest.mark.parametrize("runtime", ["vllm", "sglang"])
def test_an_engine_config_ray_refuses_is_an_error_naming_the_app(runtime: str) -> None:
    with pytest.raises(ValueError, match=r"^application chat-a: invalid engine config: (?s:.*)model_loading_config"):
        build_app(_args(runtime, {"model_loading_config": {}}))


def test_sglang_needs_a_model_path() -> None:
    with pytest.raises(ValueError, match=r"^application chat-a: engine_kwargs has no model_path"):
        build_app(_args("sglang", {"model_loading_config": {"model_id": "m"}, "engine_kwargs": {}}))
