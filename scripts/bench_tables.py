"""Render docs/bench/*.json (from scripts/bench_all.sh) as the markdown tables in docs/benchmarks.md.

python scripts/bench_tables.py docs/bench/demo.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(path: str) -> str:
    data = json.load(open(path))
    meta, rows = data["meta"], data["rows"]
    profiles = meta.get("profiles", [])
    if meta.get("measured_on") == "simulated":
        return _simulated_table(meta, rows, profiles)
    lines = [
        f"**{meta['model']}** ({meta.get('note', '')}); {meta['layers']} layers, {meta['experts_total']} experts "
        f"x {meta['expert_bytes'] / 2**20:.2f} MiB as run ({meta.get('simulated_expert_bytes', 0) / 2**20:.2f} MiB "
        f"bf16 in the simulation), top-{meta['top_k']}, {meta['tokens']} decode tokens, measured on "
        f"{meta['measured_on']} ({meta['loader']}, {meta['stall_timing']}).",
        "",
        "| predictor | cache | decode hit rate | prefetch precision | prefetch recall | stall (measured) "
        "| tok/s (measured) | " + " | ".join(f"{p} tok/s (simulated)" for p in profiles) + " |",
        "|---" * (7 + len(profiles)) + "|",
    ]
    for row in rows:
        lines.append(
            f"| {row['predictor']} | {row['cache_fraction']:g} | {fmt(row.get('decode_hit_rate'), '.3f')} "
            f"| {fmt(row['prefetch_precision'], '.3f')} | {fmt(row['prefetch_recall'], '.3f')} "
            f"| {fmt(row.get('stall_share'), '.1%')} | {fmt(row['tokens_per_s'], '.1f')} | "
            + " | ".join(fmt(row["simulated"].get(p), ".1f") for p in profiles)
            + " |"
        )
    return "\n".join(lines)


def _simulated_table(meta: dict, rows: list[dict], profiles: list[str]) -> str:
    """A routing-driven shape (`bench --routing demo|demo-fine`): nothing measured, so no measured columns."""
    src = meta["routing_source"]
    lines = [
        f"**{meta['model']}** with the routing of **{src['model']}** ({src['moe_layers']} MoE layers, "
        f"{src['experts']} experts, top-{src['top_k']}) repeated over {meta['moe_layers']} MoE layers; "
        f"{meta['experts_total']} experts x {meta['expert_bytes'] / 2**20:.2f} MiB bf16, top-{meta['top_k']}, "
        f"{meta['tokens']} decode tokens. **Every number simulated**; hit rates and prefetch precision/recall "
        "are decode-only.",
        "",
        "| predictor | cache | decode hit rate | prefetch precision | prefetch recall | "
        + " | ".join(f"{p} tok/s (simulated)" for p in profiles)
        + " |",
        "|---" * (5 + len(profiles)) + "|",
    ]
    for row in rows:
        lines.append(
            f"| {row['predictor']} | {row['cache_fraction']:g} | {fmt(row.get('decode_hit_rate'), '.3f')} "
            f"| {fmt(row['prefetch_precision'], '.3f')} | {fmt(row['prefetch_recall'], '.3f')} | "
            + " | ".join(fmt(row["simulated"].get(p), ".1f") for p in profiles)
            + " |"
        )
    return "\n".join(lines)


def speedups(path: str, a: str = "m2r2", b: str = "none") -> str:
    data = json.load(open(path))
    rows = [r for r in data["rows"] if r["predictor"] not in ("all-resident", "bandwidth-bound-on-demand")]
    out = []
    for fraction in sorted({r["cache_fraction"] for r in rows}):
        ra = next((r for r in rows if r["predictor"] == a and r["cache_fraction"] == fraction), None)
        rb = next((r for r in rows if r["predictor"] == b and r["cache_fraction"] == fraction), None)
        if ra and rb:
            cells = ", ".join(f"{p} {ra['simulated'][p] / rb['simulated'][p]:.2f}x" for p in ra["simulated"])
            out.append(f"- cache {fraction:g}: {a} / {b} simulated: {cells}")
    return "\n".join(out)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(path))
        print()
        print(speedups(path, "m2r2" if "demo" in path else "oracle"))
        print()
