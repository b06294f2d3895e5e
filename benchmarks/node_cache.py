"""The node-local cache tier on one machine: what a replica pays to read a model, with and without it.

A model directory of ``--size-gb`` (random bytes in 512 MiB shards, plus the downloader's completion
marker) is written into ``--dir``/shared/. Then, ``--rounds`` times, with the page cache of every file
involved evicted first (``sync`` + ``posix_fadvise(DONTNEED)`` per file: only these files, so other
work on the machine keeps its cache):

- ``cold_read_shared``: read every file of the shared copy (what an engine without the tier reads);
- ``copy_to_node_cache``: ``python -m arks_ray.models.node_cache`` into ``--dir``/node/ from a cold
  shared copy (the one-time cost per node: the init container of the DaemonSet or first replica);
- ``already_cached``: the same command with the copy current (every later replica's init container);
- ``cold_read_node_copy``: read every file of the node copy.

Both directories are on this machine's one disk here: the shared copy is NOT on network storage, so the
numbers are the copy's local overhead, not the bandwidth a real shared volume (NFS, CephFS) would cost.
Times are medians.

    .venv/bin/python benchmarks/node_cache.py [--size-gb 1.0] [--rounds 3]

Writes benchmarks/results/node_cache.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARD = 512 << 20


def generate(model: Path, size_gb: float) -> None:
    from arks_ray.models.files import MARKER, RemoteFile, marker_text

    model.mkdir(parents=True, exist_ok=True)
    total, i, sizes = int(size_gb * (1 << 30)), 0, {}
    while total > 0:
        size = min(SHARD, total)
        name = f"model-{i:05d}.safetensors"
        with (model / name).open("wb") as fh:
            for _ in range(0, size, 1 << 24):
                fh.write(os.urandom(min(1 << 24, size - fh.tell())))
        sizes[name] = size
        total -= size
        i += 1
    (model / "config.json").write_text("{}")
    sizes["config.json"] = 2
    listed = [RemoteFile(n, "file://" + n) for n in sizes]
    (model / MARKER).write_text(marker_text("bench", listed, sizes))


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def evict(*directories: Path) -> None:
    os.sync()
    for d in directories:
        for f in files_of(d) if d.exists() else []:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_all(directory: Path) -> tuple[float, int]:
    started, total = time.perf_counter(), 0
    for f in files_of(directory):
        with f.open("rb", buffering=0) as fh:
            while chunk := fh.read(16 << 20):
                total += len(chunk)
    return time.perf_counter() - started, total


def copy_step(shared: Path, cache: Path) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "arks_ray.models.node_cache", "--source", str(shared),
                          "--cache", str(cache), "--key", "bench"], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return time.perf_counter() - started, out.stdout.strip()


def run(base: Path, size_gb: float, rounds: int) -> dict[str, Any]:
    shared, cache = base / "shared" / "model", base / "node"
    if not shared.exists():
        generate(shared, size_gb)
    times: dict[str, list[float]] = {k: [] for k in ("cold_read_shared", "copy_to_node_cache", "already_cached",
                                                    "cold_read_node_copy")}
    nbytes, logs = 0, []
    for _ in range(rounds):
        shutil.rmtree(cache, ignore_errors=True)
        evict(shared)
        seconds, nbytes = read_all(shared)
        times["cold_read_shared"].append(seconds)
        evict(shared)
        seconds, log = copy_step(shared, cache)
        times["copy_to_node_cache"].append(seconds)
        logs.append(log)
        seconds, log = copy_step(shared, cache)
        times["already_cached"].append(seconds)
        logs.append(log)
        evict(cache)
        seconds, _ = read_all(cache / "bench")
        times["cold_read_node_copy"].append(seconds)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bytes": nbytes,
        "rounds": rounds,
        "seconds_median": medians,
        "seconds_all": times,
        "mib_per_s": {k: nbytes / v / 2**20 for k, v in medians.items() if k != "already_cached"},
        "copy_log": logs[:2],
        "cpus": os.cpu_count(),
        "note": "shared and node copies on the same local disk (no network storage); page cache evicted per "
                "file with posix_fadvise(DONTNEED)",
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["seconds_median"])
    values = [result["seconds_median"][k] for k in labels]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(labels, values, color=["#888", "#c63", "#3a3", "#369"])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}s", va="center")
    ax.set_xlabel(f"seconds (median of {result['rounds']}), {result['bytes'] / 2**30:.2f} GiB model")
    ax.set_title("Node-local cache tier: per-node copy vs reads (one local disk)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/arks-node-cache-bench"))
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = run(args.dir, args.size_gb, args.rounds)
    out = ROOT / "benchmarks" / "results" / "node_cache.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(json.dumps(result["seconds_median"], indent=1))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
