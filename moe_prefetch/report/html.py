"""The self-contained HTML report: inline CSS and SVG, no scripts, opens offline.

Plots: hit rate per layer, stall per token, the lanes per token, loads against compute per
layer, and cache occupancy, under a banner that says whether the numbers were measured on CUDA, measured
on CPU, or simulated. Built from a run dict (`profiling.build_run` / run.json).
"""

from __future__ import annotations

import html
import math

from ..runtime.lanes import RAN
from .text import MEASURED_ON, decode_split, fmt_bytes, ms, notes, pct, setup_rows, summary_rows

# -- HTML ----------------------------------------------------------------------------
_W, _H, _L, _R, _T, _B = 960, 240, 84, 24, 28, 40  # chart size and margins (px)
C_HIT, C_PREF, C_MISS, C_STALL, C_BUSY, C_EMPTY = "#4c9f70", "#2f6db5", "#d1495b", "#d1495b", "#9db4c0", "#e6e6e6"
C_HOST = "#e8a33d"  # routed experts computed on the host lane
C_DEVICE_LANE, C_LINK = "#3f7f8c", "#7b61c4"  # lanes per token: device compute, host-to-device copies
# (name, key in a token's "lanes", colour): the lanes chart's bars, in order within each token's group
LANE_SERIES = (
    ("device", "device_s", C_DEVICE_LANE),
    ("host lane", "host_s", C_HOST),
    ("link", "link_s", C_LINK),
    ("exposed", "exposed_s", C_STALL),
)
# Occupancy colours per layer (Tableau 10 without its red, which means "miss" and "stall" here).
LAYER_COLORS = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#9c755f",
    "#ff9da7",
    "#86bcb6",
    "#bab0ac",
)


def _esc(x) -> str:
    return html.escape(str(x))


def _svg(body: list[str], height: int = _H, legend: list[tuple[str, str]] = ()) -> str:
    x, items = _L, []
    for name, color in legend:
        if x > _W - 120:  # many layers: the colours repeat the order, the tooltips name them
            items.append(f'<text x="{x}" y="16" class="lg">…</text>')
            break
        items.append(
            f'<rect x="{x}" y="6" width="12" height="12" fill="{color}"/>'
            f'<text x="{x + 16}" y="16" class="lg">{_esc(name)}</text>'
        )
        x += 28 + 7 * len(name)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" '
        f'viewBox="0 0 {_W} {height}">{"".join(items)}{"".join(body)}</svg>'
    )


# Tick steps an axis may use, times a power of ten: each reads as a round number.
_NICE_STEPS = (1, 1.5, 2, 2.5, 3, 4, 5, 10)


def nice_max(value: float, ticks: int = 4) -> float:
    """The smallest axis top at or above `value` whose `ticks` equal steps are round numbers:
    10.04 -> 12 (0, 3, 6, 9, 12), 3.35 -> 4, 0.9 -> 1."""
    if value <= 0:
        return 1.0
    step = value / ticks
    power = 10 ** math.floor(math.log10(step))
    mult = next(m for m in _NICE_STEPS if m * power >= step * (1 - 1e-9))
    return ticks * mult * power


def tick_label(value: float, unit: str = "") -> str:
    """A tick of a `nice_max` axis with the digits it needs: 0, 2.5, 7.5, 12 (no float noise)."""
    return f"{value:.6g} {unit}".strip()


def _y_axis(y_max: float, fmt, title: str, height: int = _H) -> list[str]:
    out, plot_h = [], height - _T - _B
    for i in range(5):
        v = y_max * i / 4
        y = height - _B - plot_h * i / 4
        out.append(
            f'<line x1="{_L}" x2="{_W - _R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{_L - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_esc(fmt(v))}</text>'
        )
    out.append(
        f'<text x="14" y="{_T + plot_h / 2}" transform="rotate(-90 14 {_T + plot_h / 2})" '
        f'text-anchor="middle" class="axis">{_esc(title)}</text>'
    )
    return out


def _stacked_bars(
    x_labels: list, series: list[tuple[str, str, list[float]]], y_max: float, fmt, y_title: str, x_title: str
) -> str:
    """Columns of stacked rectangles, one per x label; each rectangle has a tooltip."""
    n, plot_w, plot_h = max(len(x_labels), 1), _W - _L - _R, _H - _T - _B
    y_max = y_max or 1.0
    step, body = plot_w / n, _y_axis(y_max, fmt, y_title)
    every = max(1, n // 24)
    for i, label in enumerate(x_labels):
        x, base = _L + i * step, 0.0
        for name, color, values in series:
            v = values[i]
            h = plot_h * v / y_max
            if h > 0:
                y = _H - _B - plot_h * base / y_max - h
                body.append(
                    f'<rect x="{x + step * 0.1:.2f}" y="{y:.2f}" width="{max(step * 0.8, 0.8):.2f}" '
                    f'height="{h:.2f}" fill="{color}"><title>{_esc(x_title)} {_esc(label)}: {_esc(name)} '
                    f"{_esc(fmt(v))}</title></rect>"
                )
            base += v
        if i % every == 0:
            body.append(
                f'<text x="{x + step / 2:.1f}" y="{_H - _B + 14}" text-anchor="middle" class="tick">'
                f"{_esc(label)}</text>"
            )
    body.append(f'<text x="{_L + plot_w / 2}" y="{_H - 6}" text-anchor="middle" class="axis">{_esc(x_title)}</text>')
    return _svg(body, legend=[(name, color) for name, color, _ in series])


_NOT_RECORDED = '<p class="note">Not recorded in this run.</p>'


def _hit_rate_chart(run: dict) -> str:
    rows = run["layers"]
    if not rows:
        return _NOT_RECORDED
    demand = [max(r["hits"] + r["misses"] + r.get("host_experts", 0), 1) for r in rows]
    return _stacked_bars(
        [r["layer_idx"] for r in rows],
        [
            ("hit, prefetched", C_PREF, [r["prefetch_used"] / d for r, d in zip(rows, demand)]),
            ("hit, already cached", C_HIT, [(r["hits"] - r["prefetch_used"]) / d for r, d in zip(rows, demand)]),
            ("miss, waited for its upload", C_MISS, [r["misses"] / d for r, d in zip(rows, demand)]),
            ("miss, ran on the host", C_HOST, [r.get("host_experts", 0) / d for r, d in zip(rows, demand)]),
        ],
        1.0,
        lambda v: f"{100 * v:.0f}%",
        "share of routed experts",
        "MoE layer",
    )


def _stall_chart(run: dict) -> str:
    tokens = run["tokens"][1:] or run["tokens"]
    if not tokens:
        return _NOT_RECORDED
    stall = [1e3 * t["stall_seconds"] for t in tokens]
    other = [max(1e3 * t["wall_s"] - s, 0.0) for t, s in zip(tokens, stall)]
    return _stacked_bars(
        [t["step"] for t in tokens],
        [("stalled", C_STALL, stall), ("computing", C_BUSY, other)],
        nice_max(max((s + o for s, o in zip(stall, other)), default=1.0)),
        lambda v: tick_label(v, "ms"),
        "token wall time (ms)",
        "token step",
    )


def _lanes_chart(run: dict) -> str:
    """Per decode token, one group of bars: seconds on the device, the host lane and the link,
    and the exposed time (what the lanes added to the critical path). Each bar carries its
    value from run.json (`data-seconds`) and a tooltip."""
    tokens = [t for t in (run["tokens"][1:] or run["tokens"]) if "lanes" in t]
    if not tokens:
        return _NOT_RECORDED
    n, plot_w, plot_h = len(tokens), _W - _L - _R, _H - _T - _B
    y_max = nice_max(1e3 * max((v for t in tokens for v in t["lanes"].values() if v is not None), default=0.0)) / 1e3
    step, body = plot_w / n, _y_axis(1e3 * y_max, lambda v: tick_label(v, "ms"), "time per token (ms)")
    width, every = step * 0.8 / len(LANE_SERIES), max(1, n // 24)
    for i, token in enumerate(tokens):
        x, bars = _L + i * step + step * 0.1, []
        for j, (name, key, color) in enumerate(LANE_SERIES):
            v = token["lanes"].get(key)
            if v is None:  # not obtained where this run was measured
                continue
            h = plot_h * v / y_max
            bars.append(
                f'<rect x="{x + j * width:.2f}" y="{_H - _B - h:.2f}" width="{max(width, 0.4):.2f}" height="{h:.2f}" '
                f'fill="{color}" data-lane="{key}" data-seconds="{v!r}"><title>token {token["step"]}: {_esc(name)} '
                f"{1e3 * v:.3f} ms</title></rect>"
            )
        body.append(f'<g class="lanes" data-step="{token["step"]}">{"".join(bars)}</g>')
        if i % every == 0:
            body.append(
                f'<text x="{_L + (i + 0.5) * step:.1f}" y="{_H - _B + 14}" text-anchor="middle" class="tick">'
                f"{token['step']}</text>"
            )
    body.append(f'<text x="{_L + plot_w / 2}" y="{_H - 6}" text-anchor="middle" class="axis">token step</text>')
    return _svg(body, legend=[(name, color) for name, _, color in LANE_SERIES])


def _split_rows(run: dict) -> str:
    """Per MoE layer in decode: where its routed experts ran and its ms on each lane ("-": not recorded)."""
    rows = []
    for r in run["layers"]:
        ran, lanes = decode_split(r)
        cells = [r["layer_idx"], *(ran[k] for k in RAN), *(ms(lanes.get(k)) for _, k, _ in LANE_SERIES)]
        rows.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    return "".join(rows)


def _occupancy_chart(run: dict) -> str:
    occ = run["occupancy"]
    ids, slots, per_token = occ.get("layer_ids", []), occ.get("slots", 0), occ.get("per_token", [])
    if not (ids and slots and per_token):
        return _NOT_RECORDED
    series = [
        (f"layer {l}", LAYER_COLORS[i % len(LAYER_COLORS)], [row[i] / slots for row in per_token])
        for i, l in enumerate(ids)
    ]
    series.append(("empty", C_EMPTY, [row[-1] / slots for row in per_token]))
    return _stacked_bars(
        list(range(len(per_token))), series, 1.0, lambda v: f"{100 * v:.0f}%", "share of slots", "token step"
    )


def timeline_window(run: dict, max_steps: int = 4) -> list[int]:
    """Steps the timeline shows: the last `max_steps` decode steps, or prefill alone."""
    steps = sorted({r["step"] for r in run["trace"]})
    decode = [s for s in steps if s > 0]
    return decode[-max_steps:] if decode else steps[:1]


def _timeline_chart(run: dict) -> tuple[str, int, int]:
    """Per MoE layer: its calls (upper bar, includes stalls) and the copies into slots
    for it (lower bar). Returns the SVG and how many calls and copies it drew."""
    window = set(timeline_window(run))
    calls = [r for r in run["trace"] if r["step"] in window]
    if not calls:
        return "<p>No MoE layer calls were recorded.</p>", 0, 0
    # A step begins when the forward call enters layer 0 (prefetches may be issued there),
    # before its first MoE call; older runs lack step_starts and begin at that call.
    starts = run.get("step_starts") or []
    step_start = {
        step: starts[step] if step < len(starts) else min(r["start"] for r in calls if r["step"] == step)
        for step in window
    }
    t0, t1 = min(step_start.values()), max(r["end"] for r in calls)
    loads = [e for e in run["loads"] if "start" in e and e.get("tag") and e["end"] >= t0 and e["start"] <= t1]
    ids = run["model"].get("layer_ids") or sorted({r["layer_idx"] for r in run["trace"]})
    row_h, plot_w, top = 22, _W - _L - _R, _T + 16
    height = top + row_h * len(ids) + _B
    span = max(t1 - t0, 1e-9)

    def x(t: float) -> float:
        return _L + plot_w * (min(max(t, t0), t1) - t0) / span

    body = []
    for i, layer_idx in enumerate(ids):
        y = top + i * row_h
        body.append(
            f'<text x="{_L - 6}" y="{y + 15}" text-anchor="end" class="tick">L{layer_idx}</text>'
            f'<line x1="{_L}" x2="{_W - _R}" y1="{y + row_h}" y2="{y + row_h}" class="grid"/>'
        )
    row_of = {layer_idx: i for i, layer_idx in enumerate(ids)}
    for r in calls:
        y = top + row_of[r["layer_idx"]] * row_h + 2
        body.append(
            f'<rect x="{x(r["start"]):.2f}" y="{y}" width="{max(x(r["end"]) - x(r["start"]), 0.8):.2f}" '
            f'height="9" fill="{C_HIT}"><title>step {r["step"]} layer {r["layer_idx"]}: '
            f"{1e3 * (r['end'] - r['start']):.3f} ms, experts {r['experts']}, {r['hits']} hits, "
            f"{r['misses']} misses</title></rect>"
        )
    for e in loads:
        if e["tag"][0] not in row_of:
            continue
        y = top + row_of[e["tag"][0]] * row_h + 12
        body.append(
            f'<rect x="{x(e["start"]):.2f}" y="{y}" width="{max(x(e["end"]) - x(e["start"]), 0.8):.2f}" '
            f'height="7" fill="{C_PREF}"><title>copy of layer {e["tag"][0]} expert {e["tag"][1]} into slot '
            f"{e['slot']}: {1e3 * (e['end'] - e['start']):.3f} ms</title></rect>"
        )
    for step in sorted(window):  # a dashed line where each step begins
        start = x(step_start[step])
        body.append(
            f'<line x1="{start:.2f}" x2="{start:.2f}" y1="{top - 14}" y2="{height - _B}" class="step"/>'
            f'<text x="{start + 3:.2f}" y="{top - 4}" class="tick">step {step}</text>'
        )
    for i in range(5):
        anchor = ("start", "middle", "middle", "middle", "end")[i]
        body.append(
            f'<text x="{_L + plot_w * i / 4:.1f}" y="{height - _B + 14}" text-anchor="{anchor}" '
            f'class="tick">{1e3 * span * i / 4:.1f} ms</text>'
        )
    body.append(
        f'<text x="{_L + plot_w / 2}" y="{height - 6}" text-anchor="middle" class="axis">'
        f"time since step {min(window)} began</text>"
    )
    legend = [("MoE layer call (incl. stall)", C_HIT), ("expert copy into a slot", C_PREF)]
    return _svg(body, height=height, legend=legend), len(calls), len(loads)


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1000px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}.banner{padding:10px 14px;border-radius:6px;font-weight:600}
.cuda{background:#e3f0e6}.cpu{background:#fff4d6}.simulated{background:#fde2e4}.warn{background:#ffe0b2}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}.kv td{text-align:left}.note{color:#555;font-size:13px}
svg{display:block;margin:8px 0}.tick{font-size:11px;fill:#555}.axis{font-size:12px;fill:#333}
.lg{font-size:12px;fill:#333}.grid{stroke:#e4e4e4;stroke-width:1}.step{stroke:#888;stroke-dasharray:3 3}
pre{white-space:pre-wrap;background:#f6f6f6;padding:8px}.prompt{background:#dde6f0}"""


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return (
        '<table class="kv">' + "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"
    )


def render_html(run: dict) -> str:
    """One self-contained page: inline CSS and SVG, no scripts, nothing fetched."""
    summary, tokens = run["summary"], run["tokens"]
    timeline, n_calls, n_loads = _timeline_chart(run)
    window = timeline_window(run)
    copies = (
        "copies drawn as recorded by the CPU loader thread"
        if run["measured_on"] == "cpu"
        else "per-copy times are not recorded here, so only layer calls are drawn"
    )
    layer_rows = "".join(
        f"<tr><td>{r['layer_idx']}</td><td>{r['hits']}</td><td>{r['misses']}</td><td>{pct(r['hit_rate'])}</td>"
        f"<td>{r['prefetch_issued']}</td><td>{r['prefetch_used']}</td><td>{r['prefetch_wasted']}</td>"
        f"<td>{1e3 * r['stall_seconds']:.2f}</td><td>{_esc(fmt_bytes(r['bytes_loaded']))}</td></tr>"
        for r in run["layers"]
    )
    prefill = tokens[0] if tokens else None
    prefill_note = (
        f"Step 0 (prefill, {run['config'].get('prompt_tokens', '?')} prompt tokens) took "
        f"{1e3 * prefill['wall_s']:.1f} ms with {1e3 * prefill['stall_seconds']:.1f} ms stalled; "
        "it is left out so decode steps stay readable."
        if prefill and len(tokens) > 1
        else ""
    )
    basis = run.get("lane_basis") or {}
    lane_note = " ".join(f"{name}: {basis[key]}." for name, key, _ in LANE_SERIES if key in basis)
    lane_layer_note = "Device ms per layer is not timed on CUDA." if run["measured_on"] == "cuda" else ""
    text, prompt = run.get("text"), run["config"].get("prompt")
    warnings = "".join(f'<p class="banner warn">{_esc(line)}</p>' for line in notes(run))
    about = f'<p class="note">{_esc(run["config"]["model_note"])}</p>' if run["config"].get("model_note") else ""
    generated = (
        f'<h2>Prompt and generated text</h2><pre><span class="prompt">{_esc(prompt or "")}</span>{_esc(text)}</pre>'
        '<p class="note">The prompt is shaded; the rest was generated.</p>'
        if text or prompt
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>moe-prefetch run report</title><style>{_CSS}</style></head>
<body>
<h1>moe-prefetch run report</h1>
<p class="banner {_esc(run["measured_on"])}">{_esc(MEASURED_ON[run["measured_on"]])}</p>
<p class="note">Model {_esc(run["model"].get("path", "?"))} ({_esc(run["model"].get("model_type", "?"))}),
{_esc(run.get("created", ""))}{" &mdash; <b>interrupted</b>: partial run" if summary.get("interrupted") else ""}.
Schema {_esc(run["schema"])} v{run["version"]}; every figure below is drawn from the records in run.json.</p>
{about}{warnings}
<h2>Summary</h2>{_kv_table(summary_rows(run))}
<h2>Where it ran</h2>{_kv_table(setup_rows(run))}
<h2>Hit rate per MoE layer</h2>{_hit_rate_chart(run)}
<p class="note">Routed experts (hits + misses + those run on the host lane) per layer, from run.json "layers".
Hit rate is the first two parts together; "prefetched" hits found an expert a predictor had loaded; a miss either
waited for its upload or ran on the host CPU from the host store (on_miss).</p>
<h2>Stall per token</h2>{_stall_chart(run)}
<p class="note">Each column is one token's wall time (run.json "tokens"); red is the time the compute side
waited for an expert ({_esc(run["stall_timing"])}). {_esc(prefill_note)}</p>
<h2>Lanes per token</h2>{_lanes_chart(run)}
<p class="note">Each group is one decode token (run.json "tokens"[].lanes): seconds on the device, on the host lane
and on the link, and the exposed time they added to the critical path. {_esc(lane_note)}</p>
<h2>Loads against compute</h2>{timeline}
<p class="note">Steps {min(window) if window else "-"}&ndash;{max(window) if window else "-"}: {n_calls} layer calls
from run.json "trace" and {n_loads} copies from "loads"; {_esc(copies)}.</p>
<h2>Cache occupancy</h2>{_occupancy_chart(run)}
<p class="note">Share of the {run["occupancy"].get("slots", "?")} slots holding (or loading) each layer's experts after
each token (run.json "occupancy").</p>
<h2>Per MoE layer</h2><table><tr><th>layer</th><th>hits</th><th>misses</th><th>hit rate</th><th>prefetched</th>
<th>used</th><th>wasted</th><th>stall ms</th><th>loaded</th></tr>{layer_rows}</table>
<h2>Where routed experts ran, and time per lane, per MoE layer in decode</h2>
<table class="split"><tr><th>layer</th><th>device hit</th><th>uploaded then hit</th><th>waited for the link</th>
<th>host</th><th>device ms</th><th>host lane ms</th><th>link ms</th><th>exposed ms</th></tr>{_split_rows(run)}</table>
<p class="note">Counts and seconds over the decode tokens (run.json "layers"[].decode_ran and .decode_lanes): step 0
holds the prefill and the first forward's one-off costs, which would land in whichever layer ran first; the table above
counts the whole run. {_esc(lane_layer_note)}</p>
{generated}
<h2>Definitions</h2><p class="note">Where a routed expert ran: a device hit on an expert already resident;
uploaded then hit, on one a prefetch or an upload brought in; waited, a miss that waited for its copy over the link;
host, computed on the host CPU from the host store.
Hit rate = hits / (hits + misses + host experts).
Prefetch precision = prefetched experts that were used / prefetches issued.
Prefetch recall = routed experts a prefetch or upload had staged / routed experts not already resident (staged, waited
or host), over the run; not a predictor's recall@k (eval-predictor: the share of the router's top-k it named, offline on
held-out text), since a right guess that lands late or is evicted before its layer runs counts here as a miss.
Time stalled = decode stall / decode wall time (decode = every token after the first).
H2D bandwidth = {_esc(summary["h2d_basis"])}.</p>
</body></html>
"""
