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
    """The phases' results in one. An interleaved run (``--interleave-raw``) keeps its own raw vLLM apart, as
    ``raw (beside LABEL)``, and so its raw variants (``raw NAME (beside LABEL)``); the round-by-round comparison
    of each of its other targets with its raw goes to ``paired``."""
    merged: dict[str, Any] = {"targets": {}, "hops": {}, "startup": {}, "profiles": {}, "machine": {}, "args": {},
                              "paired": {}}
    for path in paths:
        data = json.loads(path.read_text())
        targets = dict(data.get("targets", {}))
        ours = [name for name in targets if not name.startswith("raw")]
        if "raw" in targets and len(ours) == 1:  # raw (and its variants) and one arks-ray target, loads alternating
            beside = f" (beside {ours[0]})"
            for name in [n for n in targets if n != "raw"]:
                merged["paired"][name if name in ours else name + beside] = paired(targets["raw"], targets[name])
            for name in [n for n in targets if n.startswith("raw")]:
                targets[name + beside] = targets.pop(name)
        data["targets"] = targets
        for key in merged:
            merged[key].update(data.get(key, {}))
    return merged


def paired(raw: dict[str, list[dict[str, Any]]], ours: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per concurrency, each round of ours against the raw round next to it in time: tokens/s summed over the
    rounds (ours ÷ raw), the per-round ratios, and the median of the per-round TTFT p50 differences."""
    out: dict[str, Any] = {}
    for c, rounds in ours.items():
        pairs = [(r, o) for r, o in zip(raw.get(c, []), rounds, strict=False)
                 if not r.get("failed") and not o.get("failed")]
        if not pairs:
            continue
        ratios = [o["tokens_per_s"] / r["tokens_per_s"] for r, o in pairs]
        extra = sorted(o["ttft_p50_ms"] - r["ttft_p50_ms"] for r, o in pairs)
        out[c] = {"rounds": len(pairs),
                  "tokens_ratio": round(sum(o["tokens_per_s"] for _, o in pairs) /
                                        sum(r["tokens_per_s"] for r, _ in pairs), 3),
                  "round_ratios": [round(x, 2) for x in ratios],
                  "ttft_p50_extra_ms": round(extra[len(extra) // 2] if len(extra) % 2 else
                                             (extra[len(extra) // 2 - 1] + extra[len(extra) // 2]) / 2, 1)}
    return out


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


STAGES = ["ray.init", "Serve", "build task", "replica process", "replica __init__", "the rest"]


def stages(start: dict[str, Any]) -> list[float]:
    """Seconds of one start of ours (``gpu_side_by_side.py startup``) in each of ``STAGES``."""
    line = (start.get("timeline") or [{}])[0]
    parts = [start.get("ray_init_s", 0.0), start.get("ray_and_serve_s", 0.0) - start.get("ray_init_s", 0.0),
             line.get("build_s", 0.0), line.get("process_s", 0.0), line.get("init_s", 0.0)]
    return [round(x, 1) for x in [*parts, start["answered_s"] - sum(parts)]]


def _median_of(starts: list[dict[str, Any]], key: str) -> float | None:
    """The median of ``key`` over starts, ours' from their replica's timeline; None where none has it."""
    values = [v for r in starts for v in [r.get(key, (r.get("timeline") or [{}])[0].get(key))] if v is not None]
    return round(median(values), 1) if values else None


def cold_starts(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per ``startup`` run: each start's seconds to the first answer, raw's and ours, medians, the ratio, and
    the median of each stage of ours."""
    out = {}
    for key, runs in data.get("startup", {}).items():
        if not key.startswith("cold_"):
            continue
        raw = [r["answered_s"] for r in runs["raw"] if "answered_s" in r]
        ours = [r for r in runs["ours"] if "answered_s" in r]
        if not raw or not ours:
            continue
        each = [stages(r) for r in ours]
        out[key.removeprefix("cold_")] = {
            "raw": raw, "ours": [r["answered_s"] for r in ours], "raw_median": median(raw),
            "ours_median": median([r["answered_s"] for r in ours]),
            "ratio": round(median([r["answered_s"] for r in ours]) / median(raw), 2),
            "stages": dict(zip(STAGES, [round(median(list(col)), 1) for col in zip(*each, strict=True)],
                               strict=True)),
            # the EngineCore process's start and imports, within the replica's __init__ (ours) and raw's start
            "engine_core": {"ours": _median_of(ours, "engine_core_s"), "raw": _median_of(runs["raw"], "engine_core_s")},
            "failed": len(runs["ours"]) - len(ours)}
    return out


def report(data: dict[str, Any], png: Path | None) -> str:
    targets = data["targets"]
    levels = sorted({int(c) for t in targets.values() for c in t})
    lines = ["| target | concurrency | tokens/s (rounds) | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | tokens/s ÷ raw "
             "| TTFT p50 - raw ms |", "|---|---|---|---|---|---|---|---|"] if targets else []
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
    if data.get("paired"):
        lines += ["", "Interleaved with raw vLLM (each round of ours against the raw round next to it):", "",
                  "| target | concurrency | rounds | tokens/s ÷ raw (sum of rounds) | per round | TTFT p50 - raw ms "
                  "(median) |", "|---|---|---|---|---|---|"]
        for name, by_c in data["paired"].items():
            for c in sorted(by_c, key=int):
                p = by_c[c]
                lines.append(f"| {name} | {c} | {p['rounds']} | {p['tokens_ratio']:.2f} | "
                             f"{' / '.join(f'{x:.2f}' for x in p['round_ratios'])} | {p['ttft_p50_extra_ms']:+.0f} |")
    for name, by_c in data.get("hops", {}).items():
        for c, rounds in by_c.items():
            b = best(rounds)
            lines.append(f"| {name} (no proxy, no gateway) | {c} | {b['tokens_per_s']:.0f} | {b['ttft_p50_ms']} | "
                         f"{b['ttft_p90_ms']} | {b['tpot_p50_ms']} | | |")
    cold = cold_starts(data)
    if cold:
        lines += ["", "Cold starts, to the first answer (seconds; ours: the whole stack from nothing):", "",
                  "| target | ours, each | raw vLLM, each | ours ÷ raw (medians) | "
                  + " | ".join(STAGES) + " | EngineCore start, ours / raw |",
                  "|---|---|---|---|" + "---|" * (len(STAGES) + 1)]
        for name, c in cold.items():
            core = " / ".join("-" if v is None else f"{v:.1f}" for v in c["engine_core"].values())
            lines.append(f"| {name} | {' / '.join(map(str, c['ours']))} | {' / '.join(map(str, c['raw']))} | "
                         f"{c['ratio']:.2f} | " + " | ".join(f"{v:.1f}" for v in c["stages"].values())
                         + f" | {core} |")
    if png is not None and cold and not targets:
        return "\n".join([*lines, cold_plot(cold, data, png)])
    if png is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            lines.append(f"(matplotlib is not installed: no plot at {png})")
            return "\n".join(lines)
        pairs = data.get("paired") or {}
        fig, axes = plt.subplots(1, 3 if pairs else 2, figsize=(15 if pairs else 10, 4))
        a1, a2 = axes[0], axes[1]
        if pairs:
            a3 = axes[2]
            for i, (name, by_c) in enumerate(pairs.items()):
                for c, p in by_c.items():
                    x = levels.index(int(c)) + 0.15 * (i - (len(pairs) - 1) / 2)
                    a3.scatter([x] * len(p["round_ratios"]), p["round_ratios"], s=14, color=f"C{i}",
                               label=name if c == min(by_c, key=int) else None)
                    a3.plot([x], [p["tokens_ratio"]], color=f"C{i}", marker="_", markersize=20)
            a3.axhline(1.0, color="grey", linewidth=0.8)
            a3.axhline(0.9, color="grey", linewidth=0.8, linestyle=":")
            a3.set(xlabel="concurrent streams", ylabel="tokens/s ÷ raw beside it (dots: rounds; bar: all)",
                   xticks=range(len(levels)), xlim=(-0.6, len(levels) - 0.4))
            a3.set_xticklabels([str(c) for c in levels])
            a3.legend(fontsize=7)
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


def cold_plot(cold: dict[str, dict[str, Any]], data: dict[str, Any], png: Path) -> str:
    """Stacked bars: the median stages of each start of ours, beside raw vLLM's median start."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"(matplotlib is not installed: no plot at {png})"
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.9 * len(cold)))
    for row, c in enumerate(cold.values()):
        left = 0.0
        for i, (stage, seconds) in enumerate(c["stages"].items()):
            ax.barh(2 * row, seconds, left=left, color=f"C{i}", label=stage if row == 0 else None)
            left += seconds
        ax.barh(2 * row + 0.8, c["raw_median"], color="grey", label="raw vLLM" if row == 0 else None)
        ax.text(left + 1, 2 * row, f"{c['ours_median']:.1f} s ({c['ratio']:.2f}x raw)", va="center", fontsize=8)
    ax.set_yticks([2 * r for r in range(len(cold))], list(cold))
    goal = 1.3 * median([c["raw_median"] for c in cold.values()])
    ax.axvline(goal, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlim(0, max(goal, *(c["ours_median"] for c in cold.values())) * 1.25)
    ax.set(xlabel="seconds to the first answer (medians; dotted: 1.3x raw)")
    fig.legend(fontsize=7, ncol=7, loc="lower center")
    fig.suptitle(data.get("machine", {}).get("title", "cold starts"), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(png, dpi=90)
    return ""
