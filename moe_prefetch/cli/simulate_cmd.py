"""The `simulate` command: a recorded run, or a reference shape with a demo's or random routing,
replayed through the runtime's cache and scheduler on a profile, sized to its memory, with the
host's CPU lane. Wiring only: options in, the library's simulator, lines or JSON out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moe_prefetch.errors import ConfigError, ReportError
from moe_prefetch.evidence.fitting import DEFAULT_CONTEXT
from moe_prefetch.evidence.scenario import DEFAULT_WARMUP
from moe_prefetch.runtime.config import CACHE_POLICIES, RuntimeConfig
from moe_prefetch.runtime.placement import ON_MISS

from .app import Command, app, stdout
from .predictor_cmds import SHAPE_NAMES, _check_routing


@app.command(cls=Command)
def simulate(
    trace: Annotated[Path | None, typer.Option(help="run.json written by `run --report`, or its folder.")] = None,
    profile: Annotated[str, typer.Option(help="Hardware profile to simulate (`profiles` lists them).")] = ...,
    host: Annotated[
        str | None,
        typer.Option(help="Host profile (CPU, DRAM, memory) for the host lane and the CPU lane (`profiles`)."),
    ] = None,
    host_memory: Annotated[
        str | None, typer.Option(help="Installed host memory, such as 64GB (default: the host profile's).")
    ] = None,
    cache_slots: Annotated[
        int | None,
        typer.Option(
            help="Slots, a what-if that says whether it fits (default: as in the run; shapes: the largest "
            "cache that fits the profile)."
        ),
    ] = None,
    predictor: Annotated[
        str | None,
        typer.Option(
            help="recorded (the run's own), none, previous-token or oracle; shapes: also next-gate, m2r2 "
            "(default: recorded; with --shape, m2r2 on a demo's routing and none on random routing)."
        ),
    ] = None,
    shape: Annotated[str | None, typer.Option(help="Simulate this reference shape instead of --trace.")] = None,
    routing: Annotated[str, typer.Option(help="With --shape: demo, demo-fine or random.")] = "random",
    experts_dtype: Annotated[str, typer.Option(help="With --shape: auto (bf16), bf16, int8 or int4.")] = "auto",
    tokens: Annotated[int, typer.Option(help="With --shape: decode tokens measured, after the warm-up.")] = 32,
    warmup: Annotated[
        int | None,
        typer.Option(help=f"Decode tokens before measuring: the cold start (default {DEFAULT_WARMUP})."),
    ] = None,
    context: Annotated[
        int | None, typer.Option(help=f"Tokens of KV cache reserved and read (default {DEFAULT_CONTEXT}).")
    ] = None,
    lookahead: Annotated[int, typer.Option(help="With --shape: layers ahead to prefetch.")] = 2,
    on_miss: Annotated[
        str, typer.Option(help=f"Where a non-resident expert runs: {', '.join(ON_MISS)} (wait: for its upload).")
    ] = "auto",
    cache_policy: Annotated[str, typer.Option(help=f"Eviction policy: {', '.join(CACHE_POLICIES)}.")] = "lru",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Replay a recorded run (or a shape with demo or random routing) through the scheduler on a profile,
    sized to its memory, with the host's CPU lane; simulated figures."""
    from moe_prefetch.evidence.fitting import parse_bytes
    from moe_prefetch.runtime import profiles as hw

    if (trace is None) == (shape is None):
        raise ConfigError("give --trace RUN_JSON or --shape NAME (with --routing), one of the two")
    RuntimeConfig(on_miss=on_miss, cache_policy=cache_policy, experts_dtype=experts_dtype)  # the runtime's checks
    host_profile = None if host is None else hw.load_host_profile(host)
    device = hw.load_profile(profile)
    sizing = dict(
        warmup=warmup,  # None: the default, or for a short recorded run half its decode tokens
        context=DEFAULT_CONTEXT if context is None else context,
        host_memory=parse_bytes(host_memory),
    )
    if warmup is not None and warmup < 0:
        raise ConfigError(f"--warmup {warmup} must be 0 or more tokens")
    lanes = dict(on_miss=on_miss, host=host_profile, policy=cache_policy)
    if shape is not None:
        sizing["warmup"] = DEFAULT_WARMUP if warmup is None else warmup
        result = _simulate_shape(
            shape, routing, device, cache_slots, predictor, tokens, lookahead, experts_dtype, lanes, sizing
        )
    else:
        result = _simulate_trace(trace, device, cache_slots, predictor or "recorded", lanes, sizing)
    result["host"] = None if host_profile is None else host_profile.name
    if json_out:
        stdout().print_json(json.dumps(result))
        return
    out = stdout()
    fitted = result.get("fit") or {}
    if fitted and not fitted["fits"]:
        out.print(f"does not fit: {fitted['why_not']}", style="yellow", markup=False, highlight=False)
    tok = result["median_token_s"]
    out.print(
        f"simulated on {profile}: {result['tokens_per_s']:.1f} tokens/s steady state over {result['decode_tokens']} "
        f"decode tokens after {result['warmup']} of warm-up (median {tok * 1e3:.2f} ms/token), "
        f"{result['cache_slots']} slots, predictor {result['predictor']}"
    )
    cold = result.get("cold_start_tokens_per_s")
    if cold:
        out.print(f"  cold start (the warm-up tokens): {cold:.1f} tokens/s")
    out.print(
        f"  per token: compute {result['compute_s_per_token'] * 1e3:.3f} ms, exposed transfer "
        f"{result['exposed_transfer_s_per_token'] * 1e3:.3f} ms ({result['stall_share']:.1%} of the time)"
    )
    out.print(
        f"  hit rate {result['decode_hit_rate']:.1%} (decode, steady state), prefetches issued "
        f"{result['prefetch_issued']}, used {result['prefetch_used']}, {result['bytes_loaded'] / 1e9:.3f} GB moved"
    )
    out.print(
        f"  on miss {result['on_miss']}, policy {result['policy']}: host lane "
        f"{result['host_s_per_token'] * 1e3:.3f} ms/token ({result['host_experts']} experts on the host)"
    )
    cpu = result.get("cpu_bound_tokens_per_s")
    if cpu:
        out.print(
            f"  CPU lane: at most {cpu:.1f} tokens/s (host {result['cpu_host']}: the framework's and the runtime's "
            "host time per layer, and generate's per token)"
        )
    bound, config = result["bound_tokens_per_s"], result.get("config_bound_tokens_per_s")
    if bound:
        out.print(
            f"  bounds: this replay {bound:.1f} tokens/s ({bound / result['tokens_per_s']:.2f}x; each token's misses "
            f"split ideally between the host lane and the link); the configuration {config:.1f} tokens/s (Belady's "
            "MIN on the same trace and slots, which no policy or predictor beats)"
        )
    if fitted:
        gib = 2**30
        out.print(
            f"  memory: device {fitted['device_bytes'] / gib:.2f} of {fitted['usable_bytes'] / gib:.2f} GiB usable "
            f"(context {fitted['context']}), host store {fitted['host_bytes'] / gib:.1f} GiB"
            + (f" of {fitted['host_capacity'] / gib:.1f} GiB pinnable" if fitted["host_capacity"] else "")
        )


def _simulate_shape(name, routing, profile, cache_slots, predictor, tokens, lookahead, dtype, lanes, sizing) -> dict:
    from moe_prefetch.evidence.routing import PREDICTORS, RECORDED

    if name not in SHAPE_NAMES:
        raise ConfigError(f"unknown shape {name!r}; choose one of {', '.join(SHAPE_NAMES)}")
    _check_routing(f"shape:{name}", routing)
    predictor = predictor or ("none" if routing == "random" else "m2r2")  # a demo's routing: its own m2r2
    if predictor not in PREDICTORS:
        raise ConfigError(f"with --shape, --predictor is one of {', '.join(PREDICTORS)}; got {predictor!r}")
    if routing == "random" and predictor in RECORDED:
        raise ConfigError(f"random routing has no {predictor} predictions; use --routing demo-fine (or demo)")

    from moe_prefetch.evidence.anatomy import anatomy  # torch: only once every option is checked
    from moe_prefetch.evidence.fitting import fit
    from moe_prefetch.evidence.scenario import routing_for, simulate_fit

    body = anatomy(f"shape:{name}")
    fitted = fit(
        body,
        dtype,
        profile,
        lanes["host"],
        sizing["context"],
        cache_slots=cache_slots,
        host_memory=sizing["host_memory"],
    )
    if fitted.cache_slots < body.top_k:
        raise ConfigError(f"{fitted.why_not}; try --experts-dtype int4, a larger profile or a shorter --context")
    mapped, _ = routing_for(body, routing, [predictor], tokens, sizing["warmup"], lookahead=lookahead)
    result = simulate_fit(
        body,
        mapped,
        fitted,
        profile,
        lanes["host"],
        predictor,
        lanes["on_miss"],
        lanes["policy"],
        sizing["warmup"],
        lookahead,
    )
    return {
        **result,
        "predictor": predictor,
        "routing": routing,
        "fit": fitted.as_dict(),
        "cpu_host": _host_name(lanes["host"]),
    }


def _host_name(host) -> str:
    from moe_prefetch.evidence.scenario import host_or_default

    return host_or_default(host).name


def _simulate_trace(trace, profile, cache_slots, predictor, lanes, sizing) -> dict:
    from moe_prefetch.report.profiling import load_run

    if predictor not in ("recorded", "none", "previous-token", "oracle"):
        raise ConfigError(f"cannot replay predictor {predictor!r}; use recorded, none, previous-token or oracle")
    from moe_prefetch.evidence.scenario import host_or_default  # torch: only once the options are checked
    from moe_prefetch.evidence.sim import CpuLane, simulate_replay
    from moe_prefetch.runtime.profiles import default_lane_costs

    payload = load_run(trace)  # a file or the report folder, as `report` takes
    if not payload.get("replay"):
        raise ReportError(f"{trace} has no replay section; record it again with `moe-prefetch run --report DIR`")
    replay = {
        **payload["replay"],
        "trace": payload["trace"],
        "predictions": payload.get("predictions", []),
        "step_starts": payload.get("step_starts", []),
    }
    if sizing["warmup"] is None:  # a run shorter than twice the default warms up for half its tokens
        decode = len({r["step"] for r in replay["trace"]}) - 1
        sizing = {**sizing, "warmup": min(DEFAULT_WARMUP, decode // 2)}
    host = host_or_default(lanes["host"])
    fitted = _trace_fit(payload, profile, lanes["host"], cache_slots or replay["cache_slots"], sizing)
    context = sizing["context"] if fitted is None else fitted["context"]
    kv = sum(per * (context if window is None else min(context, window)) for per, window in replay.get("kv_layers", []))
    result = simulate_replay(
        replay,
        profile,
        cache_slots=cache_slots,
        predictor=predictor,
        on_miss=lanes["on_miss"],
        costs=default_lane_costs(profile, host),
        policy=lanes["policy"],
        cpu=CpuLane.of(host),
        warmup=sizing["warmup"],
        kv_bytes=kv,
    )
    return {**result, "fit": fitted, "cpu_host": host.name}


def _trace_fit(payload: dict, profile, host, slots: int, sizing) -> dict | None:
    """How the recorded run's model fits `profile` with the run's experts_dtype at `slots` slots
    (None when its model folder is not at hand)."""
    from moe_prefetch.errors import MoePrefetchError
    from moe_prefetch.evidence.anatomy import anatomy
    from moe_prefetch.evidence.fitting import fit

    model = (payload.get("config") or {}).get("model")
    dtype = (payload.get("stats") or {}).get("experts_dtype") or "auto"
    try:
        body = anatomy(str(model or "demo"))
        fitted = fit(
            body,
            dtype if dtype in body.experts else "auto",
            profile,
            host,
            sizing["context"],
            cache_slots=slots,
            host_memory=sizing["host_memory"],
        )
    except (MoePrefetchError, OSError):
        return None
    return fitted.as_dict()
