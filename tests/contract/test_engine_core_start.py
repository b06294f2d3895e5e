"""``deployments.engine_start`` against a real vLLM (the CPU build): its EngineCore, forked from the fork server,
loads the tiny model and generates, and is gone after the engine shuts down. The replica's side (the server
started as the class loads, on a replica that holds a GPU) is unit-tested; on a GPU it is measured by
``benchmarks/gpu_side_by_side.py startup`` (README, Performance)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    engine.shutdown()
    alive = [p.pid for p in cores if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(json.dumps({{"forked": forked, "cores": len(cores), "spawned": spawned,
                      "tokens": len(out.outputs[0].token_ids), "alive_after_shutdown": alive}}))

if __name__ == "__main__":
    os.environ.update(ARKS_ENGINE_CORE_START="forkserver", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    from deployments import engine_start
    assert engine_start.prestart()
    asyncio.run(main(sys.argv[1]))
"""


def test_a_real_vllm_engine_core_forked_from_the_server_serves_and_stops(tmp_path: Path) -> None:
    from arks_ray.local.tinymodel import ensure_tiny_model

    model = ensure_tiny_model(tmp_path / "models")
    script = tmp_path / "engine_core_probe.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    done = subprocess.run([sys.executable, str(script), str(model)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["forked"] is True
    assert got["cores"] == 1  # the EngineCore, a child of the fork server
    assert got["spawned"] == []
    assert got["tokens"] == 4
    assert got["alive_after_shutdown"] == []
