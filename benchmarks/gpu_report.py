"""The report of ``gpu_side_by_side.py``: merge the phases' JSON, a Markdown table with ratios, a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the most tokens/s: the steady state, past any warm-up left in the first round.
    Rounds with failed requests count only when no clean round exists."""
    clean = [r for r in rounds if not r.get("failed")] or rounds
    return max(clean, key=lambda r: r["tokens_per_s"])


def merge(paths: list[Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {"targets": {}, "hops": {}, "startup": {}, "profiles": {}, "machine": {}, "args": {}}
    for path in paths:
        data = json.loads(path.read_text())
        for key in merged:
            merged[key].update(data.get(key, {}))
    return merged


def report(data: dict[str, Any], png: Path | None) -> str:
    targets = data["targets"]
    levels = sorted({int(c) for t in targets.values() for c in t})
    lines = ["| target | concurrency | tokens/s (rounds) | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | tokens/s ÷ raw "
             "| TTFT p50 - raw ms |", "|---|---|---|---|---|---|---|---|"]
    for name, by_c in targets.items():
        for c in levels:
            rounds = by_c.get(str(c))
            if not rounds:
                continue
            b, raw = best(rounds), targets.get("raw", {}).get(str(c))
            if b.get("failed"):
                lines.append(f"| {name} | {c} | (every round had failures: {b['first_errors'][:1]}) | | | | | |")
                continue
            ratio = f"{b['tokens_per_s'] / best(raw)['tokens_per_s']:.2f}" if raw else "-"
            extra = f"{b['ttft_p50_ms'] - best(raw)['ttft_p50_ms']:+.0f}" if raw else "-"
            each = " / ".join(f"{r['tokens_per_s']:.0f}" for r in rounds)
            lines.append(f"| {name} | {c} | {b['tokens_per_s']:.0f} ({each})"
                         f" | {b['ttft_p50_ms']} | {b['ttft_p90_ms']} | {b['tpot_p50_ms']} | {ratio} | {extra} |")
    for name, by_c in data.get("hops", {}).items():
        for c, rounds in by_c.items():
            b = best(rounds)
            lines.append(f"| {name} (no proxy, no gateway) | {c} | {b['tokens_per_s']:.0f} | {b['ttft_p50_ms']} | "
                         f"{b['ttft_p90_ms']} | {b['tpot_p50_ms']} | | |")
    if png is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            lines.append(f"(matplotlib is not installed: no plot at {png})")
            return "\n".join(lines)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for name, by_c in targets.items():
            cs = [c for c in levels if str(c) in by_c and not best(by_c[str(c)]).get("failed")]
            a1.plot(cs, [best(by_c[str(c)])["tokens_per_s"] for c in cs], marker="o", label=name)
            a2.plot(cs, [best(by_c[str(c)])["ttft_p50_ms"] for c in cs], marker="o", label=name)
        a1.set(xlabel="concurrent streams", ylabel="output tokens/s", xticks=levels)
        a2.set(xlabel="concurrent streams", ylabel="TTFT p50 (ms)", xticks=levels)
        a1.legend()
        fig.suptitle(data.get("machine", {}).get("title", "GPU side by side"), fontsize=9)
        fig.tight_layout()
        fig.savefig(png, dpi=90)
    return "\n".join(lines)
