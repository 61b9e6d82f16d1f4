"""A run as text: headline rows shared by the terminal and the HTML page, notes, rich tables.

Reads only the run dict (`profiling.build_run` / run.json); imports neither torch nor the
runtime, so `moe-prefetch report` is quick.
"""

from __future__ import annotations

import collections

from ..runtime.sizing import fmt_bytes, small_cache_warning

MEASURED_ON = {
    "cuda": "Measured on CUDA. Stalls are timed with CUDA events on the compute stream; single copies are not "
    "timed, so H2D bandwidth is bytes moved over the generation's wall time (a lower bound).",
    "cpu": "Measured on CPU. A worker thread copies experts and the stall is the time the compute thread waited "
    "for it. This shows the scheduling (hits, prefetches, stalls), not GPU speeds.",
    "simulated": "Simulated, not measured: a recorded routing trace replayed through the cache and scheduler "
    "with a hardware profile's bandwidths.",
}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, fmt: str, unit: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{unit}"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.2f}"


def ran_text(ran: dict | None) -> str:
    """Where routed experts ran (`lanes.ran`), in words; "-" for a run recorded without it."""
    if not ran:
        return "-"
    return (
        f"device hit {ran['device']}, uploaded then hit {ran['uploaded']}, "
        f"waited for the link {ran['waited']}, host {ran['host']}"
    )


def lanes_text(lanes: dict | None) -> str:
    """Seconds per lane (`lanes.mean_lanes`) in ms; "-" for a run recorded without them."""
    if not lanes:
        return "-"
    return (
        f"device {ms(lanes['device_s'])} ms, host {ms(lanes['host_s'])} ms, link {ms(lanes['link_s'])} ms; "
        f"exposed {ms(lanes['exposed_s'])} ms"
    )


def summary_rows(run: dict) -> list[tuple[str, str]]:
    s = run["summary"]
    rows = [
        ("measured on", run["measured_on"] + (" (interrupted)" if s.get("interrupted") else "")),
        ("tokens generated", str(s["tokens_generated"])),
        ("time to first token", num(s["time_to_first_token_s"], ".3f", " s")),
        ("decode speed", num(s["decode_tokens_per_s"], ".2f", " tok/s")),
        ("hit rate (all / decode)", f"{pct(s['hit_rate'])} / {pct(s['decode_hit_rate'])}"),
        ("misses on host (prefill / decode)", _host_lane(s)),
        ("where routed experts ran (prefill)", ran_text(s.get("prefill_ran"))),
        ("where routed experts ran (decode)", ran_text(s.get("decode_ran"))),
        ("lanes per decode token", lanes_text(s.get("decode_lanes_per_token"))),
        *_prefetch_rows(run),
        ("time stalled (decode)", f"{pct(s['stall_share'])} ({num(s['decode_stall_s'], '.3f', ' s')})"),
        (
            "H2D bandwidth",
            num(
                None if s["h2d_bytes_per_s"] is None else s["h2d_bytes_per_s"] / 1e9, ".2f", f" GB/s ({s['h2d_basis']})"
            ),
        ),
        ("bytes loaded", fmt_bytes(s["bytes_loaded"])),
        ("experts", _experts(run)),
        (
            "device memory",
            f"{fmt_bytes(s['device_bytes'])} = pool {fmt_bytes(s['device_pool_bytes'])} "
            f"+ non-expert {fmt_bytes(s['non_expert_bytes'])}",
        ),
        ("host memory", f"store {fmt_bytes(s['host_store_bytes'])}, process RSS {fmt_bytes(s['rss_bytes'])}"),
    ]
    if s.get("device_peak_bytes") is not None:
        rows.append(("device peak allocated", fmt_bytes(s["device_peak_bytes"])))
    return rows


def _prefetch_rows(run: dict) -> list[tuple[str, str]]:
    """Precision and recall, or "no predictor" for both when none ran: with nothing prefetched
    precision has no value and a recall of 0.0% would read as a predictor that missed."""
    s = run["summary"]
    if run.get("stats", {}).get("predictor") == "none":
        return [("prefetch precision", "- (no predictor)"), ("prefetch recall", "- (no predictor)")]
    return [
        ("prefetch precision", pct(s["prefetch_precision"])),
        (
            # not a predictor's recall@k (eval-predictor, offline): see lanes.prefetch_recall
            "prefetch recall",
            f"{pct(s['prefetch_recall'])} of routed experts not already resident had been staged",
        ),
    ]


def _host_lane(s: dict) -> str:
    """Host-lane experts and seconds, prefill / decode (a v2 summary; `profiling.upgrade`)."""
    experts = f"{s.get('prefill_host_experts', 0)} / {s.get('decode_host_experts', 0)} experts"
    seconds = f"{num(s.get('prefill_host_seconds'), '.3f')} / {num(s.get('decode_host_seconds'), '.3f')} s"
    return f"{experts}, {seconds} (on_miss {s.get('on_miss')})"


def _experts(run: dict) -> str:
    """Which experts_dtype ran and its bytes per expert (runs recorded before it say "-")."""
    s, model = run["summary"], run.get("model", {})
    if s.get("experts_dtype") is None:
        return "-"
    text = f"{s['experts_dtype']}, {fmt_bytes(s.get('stored_expert_bytes'))} per expert as stored and moved"
    if model.get("expert_bytes") and model["expert_bytes"] != s.get("stored_expert_bytes"):
        text += f" ({fmt_bytes(model['expert_bytes'])} decoded to {model.get('dtype', '?')})"
    return text


def setup_rows(run: dict) -> list[tuple[str, str]]:
    st = collections.defaultdict(lambda: "?", run["stats"])  # a simulated run has no host memory
    return [
        ("device", f"{st['device']} ({st['device_reason']})"),
        ("loader", f"{st['loader']} ({st['loader_reason']})"),
        ("host memory", f"{st['host_memory']} ({st['host_memory_reason']})"),
        ("stall timing", run["stall_timing"]),
        ("lane timing", run.get("lane_basis", {}).get("summary", "not recorded in this run")),
        (
            "cache",
            f"{st['cache_slots']} slots of {fmt_bytes(st['expert_bytes'])} for {st['num_experts']} experts "
            f"in {st['moe_layers']} MoE layers",
        ),
        ("predictor", f"{st['predictor']} (lookahead {st['lookahead']})"),
    ]


def notes(run: dict) -> list[str]:
    """What a reader should know before trusting the numbers: a cache too small to reuse
    anything, layers that never hit. One line each."""
    model, slots = run.get("model", {}), run.get("stats", {}).get("cache_slots")
    out = []
    if slots is not None and model.get("top_k") and model.get("moe_layers"):
        total = model.get("experts_per_layer", 0) * model["moe_layers"] or slots
        warning = small_cache_warning(slots, model["top_k"], model["moe_layers"], total)
        if warning is not None:
            out.append(warning)
    cold = [str(r["layer_idx"]) for r in run.get("layers", []) if r["hits"] == 0 and r["misses"] > 0]
    if cold:
        out.append(f"MoE layer(s) {', '.join(cold)} had a 0% hit rate: every expert they used was copied in on demand")
    return out


def decode_split(layer: dict) -> tuple[dict, dict]:
    """One layer's decode figures (run.json "layers"[]): where its routed experts ran and its
    seconds per lane ({} where a run has no decode tokens)."""
    return layer["decode_ran"], layer.get("decode_lanes") or {}


def tables(run: dict) -> list:
    """Rich tables: summary, setup (with the reason for each automatic choice), per layer, and
    per layer where the routed experts ran and the time on each lane."""
    from rich.table import Table

    summary = Table(title=f"run: {run['model'].get('path', '?')}", show_header=False)
    for name, value in summary_rows(run):
        summary.add_row(name, value)
    setup = Table(title="where it ran", show_header=False)
    for name, value in setup_rows(run):
        setup.add_row(name, value)
    per_layer = Table(title="per MoE layer (prefetches: issued, used, wasted)")
    for col in ("layer", "hits", "misses", "host", "hit rate", "issued", "used", "wasted", "stall ms", "loaded"):
        per_layer.add_column(col, justify="right", no_wrap=True)
    for row in run["layers"]:
        per_layer.add_row(
            str(row["layer_idx"]),
            str(row["hits"]),
            str(row["misses"]),
            str(row.get("host_experts", 0)),
            pct(row["hit_rate"]),
            str(row["prefetch_issued"]),
            str(row["prefetch_used"]),
            str(row["prefetch_wasted"]),
            f"{1e3 * row['stall_seconds']:.2f}",
            fmt_bytes(row["bytes_loaded"]),
        )
    split = Table(
        title="per MoE layer in decode (after the first token): where routed experts ran, and ms on each lane"
    )
    for col in ("layer", "device hit", "uploaded hit", "waited", "host", "device", "host lane", "link", "exposed"):
        split.add_column(col, justify="right", no_wrap=True)
    for row in run["layers"]:
        ran, lanes = decode_split(row)
        split.add_row(
            str(row["layer_idx"]),
            *(str(ran[k]) for k in ("device", "uploaded", "waited", "host")),
            *(ms(lanes.get(k)) for k in ("device_s", "host_s", "link_s", "exposed_s")),
        )
    return [summary, setup, per_layer, split]


# -- bench -------------------------------------------------------------------------------------
# What the two bound rows of a measured bench are (bench._bounds).
BOUND_ROWS = {
    "all-resident": "every expert on the device: compute and the CPU lane (only where every expert fits)",
    "bandwidth-bound-on-demand": "each token's routed experts copied in over the link, nothing cached or predicted",
}


def cache_label(row: dict) -> str:
    """How a bench row's cache was chosen: 'fit' (the largest that fits each profile), a share of
    that, a what-if share of bf16 experts' memory, or (measured benches) a share of every expert."""
    if row.get("what_if"):
        return f"{row['cache_fraction']:g} bf16?"
    cache = row.get("cache")
    if cache is None:
        return f"{row['cache_fraction']:g}"
    return "fit" if cache == "fit" else f"{cache:g} fit"


def rate(tokens_per_s: float | None) -> str:
    """Tokens/s in a narrow column: 116513, 5053.6, 0.61."""
    if tokens_per_s is None:
        return "-"
    return f"{tokens_per_s:.0f}" if tokens_per_s >= 1000 else f"{tokens_per_s:.{1 if tokens_per_s >= 1 else 2}f}"


def stacked(name: str, width: int = 8) -> str:
    """A profile name broken after its hyphens into lines of at most `width` characters, for a
    column header ('rtx3060-12gb' -> 'rtx3060-' / '12gb'): its numbers set the column's width."""
    lines: list[str] = []
    for part in name.replace("-", "-\n").split("\n"):
        if lines and len(lines[-1]) + len(part) <= width:
            lines[-1] += part
        else:
            lines.append(part)
    return "\n".join(lines)


def bench_table(result: dict, title: str, *, policies: bool, formats: bool):
    """`moe-prefetch bench`'s rows as one rich table, narrow enough for 120 columns with two
    profiles: short headers, whole labels and numbers, a column only where a row has a value
    (a simulated bench measures no tok/s) and a legend for the columns shown. `policies` and
    `formats` add the eviction policy and expert format columns (when compared)."""
    from rich import box
    from rich.table import Table

    rows, meta = result["rows"], result["meta"]
    profiles = meta.get("profiles") or sorted({n for r in rows for n in r.get("simulated", {})})
    predicts = lambda r: r["predictor"] not in ("none", *BOUND_ROWS)  # noqa: E731  (P and R apply)
    # (header, legend, cells, is a label): labels are always shown, other columns where a row has a value
    columns = [
        ("on\nmiss", "on miss: where a missed expert ran (wait: for its upload, host, auto)", "on_miss", True),
        ("policy", "policy: the cache's eviction policy", "policy", True) if policies else None,
        ("experts", "experts: how experts were stored (--experts-dtype)", "experts_dtype", True) if formats else None,
        ("predictor", None, "predictor", True),
        (
            "cache",
            "cache: fit, the largest cache that fits each profile (SHARE fit: a share of it); measured benches: a "
            "share of all experts; N bf16?: a what-if, a share of bf16 experts' memory",
            "cache_fraction",
            False,
        ),
        ("hit", "hit: hits / (hits + misses), every token", "hit_rate", False),
        ("decode\nhit", "decode hit: the same without the first token (prefill)", "decode_hit_rate", False),
        ("pf\nprec", "pf prec: prefetch precision, prefetches used / issued", "prefetch_precision", False),
        (
            "pf\nrecall",
            "pf recall: prefetch recall, prefetched / routed experts not already resident (not a predictor's recall@k)",
            "prefetch_recall",
            False,
        ),
        ("stall", "stall: share of decode time spent waiting for copies", "stall_share", False),
        ("tok/s", f"tok/s: decode tokens/s measured on {meta.get('measured_on', '?')}", "tokens_per_s", False),
    ]
    cells = {
        "cache_fraction": cache_label,
        "prefetch_precision": lambda r: pct(r.get("prefetch_precision")) if predicts(r) else "-",
        "prefetch_recall": lambda r: pct(r.get("prefetch_recall")) if predicts(r) else "-",
        "tokens_per_s": lambda r: rate(r.get("tokens_per_s")),
    }

    def cell(row: dict, key: str, label: bool) -> str:
        if key in cells:
            return cells[key](row)
        return str(row.get(key, "-")) if label else pct(row.get(key))

    shown, legend = [], []
    for column in filter(None, columns):
        header, text, key, label = column
        values = [cell(r, key, label) for r in rows]
        if label or any(v != "-" for v in values):
            shown.append((header, values, label))
            legend += [text] if text else []
    # A measured bench's slots are its own (the same on every profile, the cache column) and its
    # bounds stay in the JSON: the table keeps to 120 columns with two profiles.
    simulated = meta.get("measured_on") == "simulated"
    fits = lambda r, p: (r.get("fits") or {}).get(p, True)  # noqa: E731
    slots = lambda r, p: r["cache_slots"].get(p) if isinstance(r.get("cache_slots"), dict) else None  # noqa: E731
    for kind, key, text in (
        ("slots", None, "the cache on that profile, in expert slots"),
        (
            "sim",
            "simulated",
            "steady-state decode tokens/s simulated on that hardware profile (no fit: the "
            "configuration does not fit its device or host memory, see --json)",
        ),
        (
            "bound",
            "config_bound",
            "the configuration's bound in tokens/s (Belady's MIN on the same trace and slots, "
            "the best host/link split, the CPU lane: no policy or predictor beats it)",
        ),
    ):
        if kind != "sim" and not simulated:
            continue
        if key is None:
            values = {p: [str(slots(r, p)) if slots(r, p) is not None else "-" for r in rows] for p in profiles}
        else:
            values = {p: [rate(r.get(key, {}).get(p)) if fits(r, p) else "no fit" for r in rows] for p in profiles}
        names = [p for p in profiles if any(v not in ("-", "no fit") for v in values[p])]
        shown += [(f"{kind}\n{stacked(p)}", values[p], False) for p in names]
        legend += [f"{kind} PROFILE: {text} ({', '.join(names)})"] if names else []
    bounds = [name for name in BOUND_ROWS if any(r["predictor"] == name for r in rows)]
    legend += [f"{name}: {BOUND_ROWS[name]}" for name in bounds]
    legend.append("-: does not apply here, or not measured")
    table = Table(
        title=title,
        caption="; ".join(legend),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1, 0, 0),  # with the box's blank rule: two spaces between columns
    )
    for header, _, label in shown:
        # Labels are never cut; a number folds onto a second line rather than lose digits (only
        # when the terminal is narrower than the table; headers already break at their newlines).
        table.add_column(header, justify="left" if label else "right", no_wrap=label, overflow="fold")
    for i in range(len(rows)):
        table.add_row(*(values[i] for _, values, _ in shown))
    return table
