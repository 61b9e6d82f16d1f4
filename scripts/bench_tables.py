"""Render docs/bench/*.json (from scripts/bench_all.sh) as the markdown tables in docs/benchmarks.md.

python scripts/bench_tables.py docs/bench/demo.json [more.json ...]

Every simulated cell is from a configuration sized to its profile: where a row does not fit a
profile's device or host memory the cell says "no fit", never a figure.
"""

from __future__ import annotations

import json
import sys


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def sim_cell(row: dict, profile: str) -> str:
    """`slots: tok/s (configuration bound)` on one profile, or `no fit`."""
    slots = row.get("cache_slots")
    slots = slots.get(profile) if isinstance(slots, dict) else slots
    if not (row.get("fits") or {}).get(profile, True):
        return f"{slots}: no fit"
    cell = f"{slots}: {fmt(row['simulated'].get(profile), '.1f')}"
    bound = (row.get("config_bound") or {}).get(profile)
    return cell + (f" ({bound:.1f})" if bound is not None else "")


def cache_label(row: dict) -> str:
    if row.get("what_if"):
        return f"what-if {row['cache_fraction']:g} of bf16"
    cache = row.get("cache")
    if cache is None:
        return f"{row['cache_fraction']:g}"
    return "fit" if cache == "fit" else f"{cache:g} of fit"


def table(path: str) -> str:
    data = json.load(open(path))
    meta, rows = data["meta"], data["rows"]
    profiles = meta.get("profiles", [])
    host = meta.get("host") or "ddr4-3200-2ch (default)"
    sims = " | ".join(f"{p}: slots: tok/s (config bound), simulated" for p in profiles)
    if meta.get("measured_on") == "simulated":
        return _simulated_table(meta, rows, profiles, host, sims)
    lines = [
        f"**{meta['model']}** ({meta.get('note', '')}); {meta['layers']} layers, {meta['experts_total']} experts "
        f"x {meta['expert_bytes'] / 2**20:.2f} MiB as run, top-{meta['top_k']}, {meta['tokens']} decode tokens after "
        f"{meta.get('warmup', 0)} of warm-up, measured on {meta['measured_on']} ({meta['loader']}, "
        f"{meta['stall_timing']}); simulated columns replay each run with host {host} (host lane, CPU lane).",
        "",
        f"| predictor | cache | decode hit rate | prefetch precision | prefetch recall | stall (measured) "
        f"| tok/s (measured) | {sims} |",
        "|---" * (7 + len(profiles)) + "|",
    ]
    for row in rows:
        lines.append(
            f"| {row['predictor']} | {cache_label(row)} | {fmt(row.get('decode_hit_rate'), '.3f')} "
            f"| {fmt(row['prefetch_precision'], '.3f')} | {fmt(row['prefetch_recall'], '.3f')} "
            f"| {fmt(row.get('stall_share'), '.1%')} | {fmt(row['tokens_per_s'], '.1f')} | "
            + " | ".join(sim_cell(row, p) for p in profiles)
            + " |"
        )
    return "\n".join(lines)


def _simulated_table(meta: dict, rows: list[dict], profiles: list[str], host: str, sims: str) -> str:
    """A shape simulated over a routing (`bench --model shape:NAME`): nothing measured."""
    src = meta.get("routing_source")
    routing = (
        f"the routing of **{src['model']}** ({src['moe_layers']} MoE layers, {src['experts']} experts, "
        f"top-{src['top_k']}) repeated over {meta['moe_layers']} MoE layers"
        if src
        else f"{meta['routing']} routing"
    )
    lines = [
        f"**{meta['model']}** with {routing}; {meta['experts_total']} experts x "
        f"{meta['expert_bytes'] / 2**20:.2f} MiB bf16, top-{meta['top_k']}; host {host}"
        + (f" with {meta['host_memory'] / 2**30:.0f} GiB" if meta.get("host_memory") else "")
        + f"; context {meta.get('context')}; {meta['tokens']} decode tokens after {meta.get('warmup', 0)} of warm-up. "
        "**Every number simulated**, each at the cache that fits its profile; hit rates and prefetch "
        "precision/recall are the first profile's, decode only.",
        "",
        f"| experts | on miss | predictor | cache | decode hit rate | prefetch precision | prefetch recall | {sims} |",
        "|---" * (7 + len(profiles)) + "|",
    ]
    unfit: dict[str, str] = {}
    for row in rows:
        fits = row.get("fits") or {}
        if fits and not any(fits.values()):  # fits no profile: no figure of it in a doc
            bound = row["predictor"] in ("all-resident", "bandwidth-bound-on-demand")
            what = f"the {row['predictor']} row" if bound else f"{row.get('experts_dtype')} experts"
            unfit.setdefault(what, next((w for w in (row.get("why_not") or {}).values() if w), ""))
            continue
        first = fits.get(profiles[0], True) if profiles else True  # hit rates are the first profile's
        keys = ("decode_hit_rate", "prefetch_precision", "prefetch_recall")
        rates = [fmt(row.get(k), ".3f") if first else "-" for k in keys]
        lines.append(
            f"| {row.get('experts_dtype', '-')} | {row.get('on_miss', '-')} | {row['predictor']} | {cache_label(row)} "
            f"| {' | '.join(rates)} | " + " | ".join(sim_cell(row, p) for p in profiles) + " |"
        )
    if unfit:
        parts = [what + (f" ({why})" if why else "") for what, why in unfit.items()]
        lines += ["", "Fits no profile here, so not shown: " + "; ".join(parts) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(path))
        print()
