"""Our hooks into vLLM against a real vLLM (the CPU build), on one engine started once for the module:

- ``deployments.engine_start``: its EngineCore, forked from the fork server, loads the tiny model and generates,
  and is gone after the engine shuts down. The replica's side (the server started as the class loads, on a
  replica that holds a GPU) is unit-tested; on a GPU it is measured by ``benchmarks/gpu_side_by_side.py startup``.
- the stride (``deployments.vllm_engine.output_processor``): set on vLLM's output processor as ``ArksLLMServer``
  sets it, a new request's tokens come in one output for the first, then one per stride, the end included; set
  back to 1, every token comes on its own. The rule that picks the stride is unit-tested
  (``tests/unit/test_engine_stride.py``); on a GPU it is measured by ``gpu_side_by_side.py``.

(README, Performance)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.support.paths import ROOT

pytest.importorskip("vllm")

SCRIPT = """
import asyncio, json, os, sys
sys.path.insert(0, {root!r})

async def main(model):
    import psutil
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from deployments import engine_start

    args = AsyncEngineArgs(model=model, dtype="bfloat16", max_model_len=512, enforce_eager=True)
    with engine_start.engine_processes() as forked:
        engine = AsyncLLM.from_engine_args(args)
    mine = psutil.Process().children()
    servers = [p for p in mine if any("multiprocessing.forkserver" in part for part in p.cmdline())]
    cores = [child for server in servers for child in server.children()]  # forked from the server
    spawned = [p.pid for p in mine if any("multiprocessing.spawn" in part for part in p.cmdline())]
    out = None
    async for out in engine.generate("hello", SamplingParams(max_tokens=4, ignore_eos=True), request_id="r1"):
        pass

    from types import SimpleNamespace
    from vllm.sampling_params import RequestOutputKind
    from deployments.vllm_engine import output_processor

    outputs = output_processor(SimpleNamespace(_engine_client=engine))

    async def deltas(rid):
        params = SamplingParams(max_tokens=17, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        return [len(o.outputs[0].token_ids) async for o in engine.generate("hello", params, request_id=rid)]

    found = outputs is not None
    outputs.stream_interval = 4
    strided = await deltas("strided")
    outputs.stream_interval = 1
    every = await deltas("every")
    engine.shutdown()
    alive = [p.pid for p in cores if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(json.dumps({{"forked": forked, "cores": len(cores), "spawned": spawned,
                      "tokens": len(out.outputs[0].token_ids), "alive_after_shutdown": alive,
                      "stride_found": found, "strided": strided, "every": every}}))

if __name__ == "__main__":
    os.environ.update(ARKS_ENGINE_CORE_START="forkserver", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    from deployments import engine_start
    assert engine_start.prestart()
    asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real vLLM engine, forked from the server, probed by both tests."""
    from arks_ray.local.tinymodel import ensure_tiny_model

    tmp = tmp_path_factory.mktemp("vllm_hooks")
    model = ensure_tiny_model(tmp / "models")
    script = tmp / "engine_core_probe.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    done = subprocess.run([sys.executable, str(script), str(model)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    got: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return got


def test_a_real_vllm_engine_core_forked_from_the_server_serves_and_stops(probe: dict[str, Any]) -> None:
    assert probe["forked"] is True
    assert probe["cores"] == 1  # the EngineCore, a child of the fork server
    assert probe["spawned"] == []
    assert probe["tokens"] == 4
    assert probe["alive_after_shutdown"] == []


def test_a_real_vllm_hands_over_a_streams_tokens_once_per_stride_set_on_its_output_processor(
        probe: dict[str, Any]) -> None:
    assert probe["stride_found"] is True
    assert probe["strided"] == [1, 4, 4, 4, 4]  # the first token at once, then every 4, the 17th ending it
    assert probe["every"] == [1] * 17
