"""vLLM's own OpenAI server as an engine replica's frontend (``spec.engineFrontend: vllmServer``): its
command line, and what its Prometheus page says about the scheduler.

Used by the render (``arks_ray.render.serve_config``: ``check_server_frontend``) and by the Serve deployment
that runs the server in a child process (``deployments.vllm_server``). With Ray's ``LLMServer`` (the default
frontend, ``rayLLM``), vLLM's OpenAI layer and output handling run on the Serve replica's event loop, next
to Ray's own per-item work; here they run in their own process, exactly as ``vllm serve`` runs them, and the
replica only relays bytes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from arks_ray.engines.dynamo import LaunchSpec
from arks_ray.engines.executor import engine_workers

FRONTEND_KEY = "arks_frontend"
"""The key of Ray's ``LLMConfig.experimental_configs`` that carries the frontend into the engine app."""
RAY_LLM, VLLM_SERVER = "rayLLM", "vllmServer"

_RAY_ONLY = ("distributed_executor_backend",)
"""Engine keyword arguments Ray's frontend needs and the server decides itself (one GPU: in process)."""


def frontend(llm_config: Mapping[str, Any]) -> str:
    """The frontend a rendered (dict) LLMConfig asks for."""
    return str((llm_config.get("experimental_configs") or {}).get(FRONTEND_KEY) or RAY_LLM)


def check_server_frontend(engine_kwargs: dict[str, Any], lora: bool = False) -> None:
    """Raise ValueError if vLLM's server cannot be this app's frontend: it runs the engine on its replica's
    one GPU (or CPU), so no tensor or pipeline parallelism across Ray's placement group yet, and no LoRA
    adapters, which Ray's frontend loads."""
    workers = engine_workers(engine_kwargs)
    if workers > 1:
        raise ValueError(f"engineFrontend {VLLM_SERVER} runs one engine worker per replica, not {workers} "
                         "(tensor x pipeline parallel); use the rayLLM frontend")
    if lora:
        raise ValueError(f"engineFrontend {VLLM_SERVER} does not serve LoRA adapters yet; use the rayLLM frontend")


def cli_words(engine_kwargs: Mapping[str, Any]) -> list[str]:
    """Engine keyword arguments as ``vllm serve`` flags: the inverse of
    ``arks_ray.render.engine_args.parse_engine_args`` (True is ``--flag``, False ``--no-flag``, a list the
    flag then its values, a dict its JSON)."""
    words: list[str] = []
    for key, value in engine_kwargs.items():
        if value is None or key in _RAY_ONLY:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value is False:
            words.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, list | tuple):
            words += [flag, *(_word(v) for v in value)]
        else:
            words += [flag, _word(value)]
    return words


def _word(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def server_spec(python: str, port: int, model: str, served_name: str, engine_kwargs: Mapping[str, Any],
                env: Mapping[str, str] | None = None) -> LaunchSpec:
    """The server's command line: on loopback only (the replica relays to it), serving ``served_name``."""
    argv = (python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", served_name,
            "--host", "127.0.0.1", "--port", str(port), *cli_words(engine_kwargs))
    return LaunchSpec("vllm-server", argv, dict(env or {}))


KEEP_ALIVE_ENV, KEEP_ALIVE_S = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE", 60
"""How long vLLM's server keeps an idle connection (vLLM's own default: 5 s): longer than the replica's pool keeps
one, so that the pool never sends on a connection the server is closing. The variable, when set, wins."""


def keep_alive_s(environ: Mapping[str, str]) -> int:
    """The server's keep-alive from ``environ`` (``KEEP_ALIVE_ENV``, else ``KEEP_ALIVE_S``). vLLM reads the variable
    as whole seconds; anything else is a ValueError naming it, before a server is started."""
    raw = environ.get(KEEP_ALIVE_ENV)
    if raw is None:
        return KEEP_ALIVE_S
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{KEEP_ALIVE_ENV} must be a whole number of seconds, at least 1 (got {raw!r})")
    return value


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{.*\})?\s+(\S+)(?:\s+-?\d+)?$")
"""One sample line of the Prometheus text format: name, labels, value, timestamp."""
SCHEDULER_GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
                    "vllm:kv_cache_usage_perc": "kv_cache_usage"}


def scheduler_gauges(metrics_text: str) -> dict[str, float]:
    """The scheduler's gauges from vLLM's Prometheus page, over its label sets (engines): requests running
    and waiting (summed), and KV-cache use (the largest). A gauge not on the page is absent."""
    found: dict[str, float] = {}
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line) if line.startswith("vllm:") else None
        key = SCHEDULER_GAUGES.get(match.group(1)) if match else None
        if key is None or match is None:
            continue
        try:
            value = float(match.group(2))
        except ValueError:
            continue
        if not math.isfinite(value):
            continue
        found[key] = max(found.get(key, 0.0), value) if key == "kv_cache_usage" else found.get(key, 0.0) + value
    return found
