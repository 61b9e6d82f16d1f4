"""Policy benchmark: every predictor at every cache size, measured side by side in one run.

For each (predictor, cache fraction) the model generates the same greedy continuation of
one prompt with its experts offloaded; we measure hit rate, prefetch precision and recall,
share of time stalled and decode tokens/s on this device, keep the routing trace and the
predictions, and add simulated tokens/s on each named hardware profile (same scheduler,
virtual link at the profile's bandwidth, roofline compute). Rows also include an
all-experts-resident bound and the bandwidth bound of on-demand loading per profile.

Outputs are exact whatever the predictor (checked here too: every run's tokens must equal
the first run's).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import statistics
import time

import torch

from ..experts.compression import make_codec
from ..experts.layout import find_moe_layers, spec_of
from ..model.integration import attach
from ..runtime.lanes import prefetch_recall
from .anatomy import expert_traffic
from .fitting import CACHE_FIT, DEFAULT_CONTEXT, fit
from .scenario import DEFAULT_PROMPT, DEFAULT_WARMUP
from .shapes import SHAPES, shape_config, shape_model  # noqa: F401  (bench.SHAPES: the shapes' home for callers)
from .sim import CpuLane, Roofline, replay_payload, simulate_replay

logger = logging.getLogger(__name__)

SIM_EXPERTS_DTYPES = ("auto", "bf16", "int8", "int4")  # what a shape's rows may simulate


def shape_sizes(name: str, layers: int | None = None) -> dict:
    """What the simulator needs of a shape at its real depth (or `layers`), vocabulary and tying,
    from a skeleton on the meta device (no memory, no weights): `anatomy.Anatomy.sim_sizes`."""
    from .anatomy import anatomy, of_config

    if layers is None:
        return anatomy(f"shape:{name}").sim_sizes()
    return of_config(shape_config(name, layers, real=True), f"shape:{name}", torch.bfloat16).sim_sizes()


def shape_replay(sizes: dict, mapped: dict, predictor: str, cache_slots: int, lookahead: int) -> dict:
    """A `sim.simulate_replay` payload for one predictor of a routing-driven shape."""
    return {
        **sizes,
        "trace": mapped["trace"],
        "predictions": mapped["predictions"].get(predictor, []),
        "cache_slots": cache_slots,
        "lookahead": lookahead,
        "predictor": predictor,
    }


def run_routed_bench(
    model: str,
    routing: str,
    predictors: list[str],
    tokens: int,
    profiles: list,
    prompt: str = DEFAULT_PROMPT,
    lookahead: int = 2,
    progress=None,
    on_miss: list[str] | tuple[str, ...] = ("wait",),
    host=None,
    policies: list[str] | tuple[str, ...] = ("lru",),
    experts_dtypes: list[str] | tuple[str, ...] = ("auto",),
    caches: list | tuple = (CACHE_FIT,),
    fractions: list[float] | tuple[float, ...] = (),
    warmup: int = DEFAULT_WARMUP,
    context: int = DEFAULT_CONTEXT,
    host_memory: int | None = None,
) -> dict:
    """Simulate `model` ('shape:NAME' at its real depth, or a checkpoint folder sized from its
    config) on each profile, replaying `routing` ('random', or a demo's recorded routing and
    predictions repeated across the model's layers: `scenario.routing_for`). Nothing is measured
    here: every row is simulated, at the steady state after `warmup` decode tokens.

    Each row is sized to each profile (`fitting.fit`): `caches` are "fit" (the largest cache
    that fits the device after weights, KV for `context`, buffers and the prefill peak) or shares
    of it; `fractions` add what-if rows, a share of bf16 experts' memory, which say whether they fit.
    Per profile a row carries cache_slots, fits, device_bytes, host_bytes, the simulated tokens/s
    (None where the cache is below top_k), the cold start, the replay's three-lane bound and the
    configuration's bound (Belady's MIN). `host` (a HostProfile; None: the shipped desktop) sets
    the host lane, the CPU lane and the host memory (`host_memory` overrides it). Hit rates and
    prefetch precision/recall are the first profile's."""
    from .anatomy import anatomy as anatomy_of
    from .scenario import routing_for, simulate_fit

    body = anatomy_of(model)
    mapped, recording = routing_for(body, routing, predictors, tokens, warmup, prompt, lookahead)
    total, top_k = body.total_experts, body.top_k
    choices = [(c, None) for c in caches] + [(None, f) for f in fractions]
    rows = []
    for dtype, (cache, fraction), policy, placement, predictor in itertools.product(
        experts_dtypes, choices, policies, on_miss, predictors
    ):
        fits = {
            p.name: fit(
                body,
                dtype,
                p,
                host,
                context,
                cache=cache or CACHE_FIT,
                cache_fraction=fraction,
                host_memory=host_memory,
            )
            for p in profiles
        }
        sims = {
            p.name: simulate_fit(body, mapped, fits[p.name], p, host, predictor, placement, policy, warmup, lookahead)
            for p in profiles
        }
        first = next((r for r in sims.values() if r is not None), None)
        value = functools.partial(_per_profile, sims)
        row = {
            "on_miss": placement,
            "policy": policy,
            "experts_dtype": dtype,
            "expert_bytes": body.expert_bytes(dtype),
            "predictor": predictor,
            "cache": cache if fraction is None else None,
            "cache_fraction": fraction,  # a what-if: a share of bf16 experts' memory
            "what_if": fraction is not None,
            "cache_slots": {n: f.cache_slots for n, f in fits.items()},
            "fits": {n: f.fits for n, f in fits.items()},
            "device_bytes": {n: f.device_bytes for n, f in fits.items()},
            "host_bytes": {n: f.host_bytes for n, f in fits.items()},
            "why_not": {n: f.why_not for n, f in fits.items() if f.why_not},
            "hit_rate": first["hit_rate"] if first else None,
            "decode_hit_rate": first["decode_hit_rate"] if first else None,
            "prefetch_precision": first["decode_prefetch_precision"] if first else None,
            "prefetch_recall": first["decode_prefetch_recall"] if first else None,
            "stall_share": None,
            "tokens_per_s": None,  # nothing ran on this device
            "simulated": value("tokens_per_s"),
            "cold_start": value("cold_start_tokens_per_s"),
            "bound": value("bound_tokens_per_s"),
            "config_bound": value("config_bound_tokens_per_s"),
            "bound_ratio": {
                n: (r["bound_tokens_per_s"] / r["tokens_per_s"] if r and r["tokens_per_s"] else None)
                for n, r in sims.items()
            },
            "simulated_decode_hit_rate": value("decode_hit_rate"),
            "simulated_stall_share": value("stall_share"),
            "cpu_bound": value("cpu_bound_tokens_per_s"),
            "simulated_host_experts_per_token": {
                n: (r["host_experts"] / max(1, r["decode_tokens"] + warmup + 1) if r else None) for n, r in sims.items()
            },
        }
        rows.append(row)
        if progress is not None:
            progress(row)
    dtype = experts_dtypes[0]
    roof = _bounds(body, dtype, profiles, host, mapped["trace"], warmup, context, host_memory)
    expert_bytes = body.expert_bytes("bf16")
    meta = {
        "experts_total": total,
        "top_k": top_k,
        "expert_bytes": expert_bytes,
        "simulated_expert_bytes": expert_bytes,
        "tokens": tokens,
        "warmup": warmup,
        "context": context,
        "moe_layers": body.moe_layers,
        "layers": body.num_layers,
        "vocab_size": body.vocab_size,
        "non_expert_bytes": body.non_expert_bytes,
        "kv_bytes_per_token": body.kv_bytes_per_token(),
        "measured_on": "simulated",
        "loader": "simulated link",
        "stall_timing": "simulated",
        "routing": routing,
        "routing_source": None
        if recording is None
        else {
            "model": routing,
            "moe_layers": len(recording["moe_layer_ids"]),
            "experts": recording["num_experts"],
            "top_k": recording["top_k"],
        },
    }
    return {"rows": rows + roof, "meta": meta}


def _per_profile(sims: dict, key: str) -> dict:
    """{profile: sims[profile][key]}, None where nothing was simulated."""
    return {n: (r[key] if r is not None else None) for n, r in sims.items()}


def _decode_tokens_per_s(step_starts: list[float]) -> float:
    """Decode throughput from the times each forward entered layer 0 (step 0 is prefill)."""
    if len(step_starts) < 3:
        return 0.0
    return (len(step_starts) - 2) / (step_starts[-1] - step_starts[1])


def run_bench(
    model,
    prompt_ids: torch.Tensor,
    predictors: list[str],
    fractions: list[float],
    tokens: int,
    device: str = "auto",
    profiles: list | None = None,
    predictor_path: str | None = None,
    lookahead: int = 2,
    progress=None,
    sim_itemsize: int = 2,
    on_miss: str = "wait",
    policies: list[str] | tuple[str, ...] = ("lru",),
    experts_dtype: str = "auto",
    host=None,
    warmup: int = 0,
    context: int = DEFAULT_CONTEXT,
    host_memory: int | None = None,
) -> dict:
    """Measure every (predictor, fraction, eviction policy) on `model`; returns {"rows": [...], "meta": {...}}.
    Each configuration generates `warmup + tokens` tokens; the measured and simulated figures are
    the last `tokens` (the steady state).
    `experts_dtype` compresses the experts for every run (a cache fraction is then of the device
    memory the model's own experts would need, so compressed experts get more slots), and the
    simulated profiles use the compressed sizes.
    `on_miss` places the misses of the measured runs (the simulated columns replay them as
    waits: the simulator's host lane is used by the routed bench).

    Simulated profiles see the model's weights at `sim_itemsize` bytes per parameter (2: bf16,
    as on a GPU) whatever dtype ran here (often fp32 on CPU)."""
    from .anatomy import of_model
    from .scenario import host_or_default

    layers = find_moe_layers(model)
    spec = spec_of(layers)
    total = sum(layer.num_experts for layer in layers)
    top_k = max(layer.top_k for layer in layers)
    codec = make_codec(spec, experts_dtype)
    sim_dtype = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32}[sim_itemsize]
    sim_spec = dataclasses.replace(spec, dtype=sim_dtype)
    sim_experts = expert_traffic(make_codec(sim_spec, experts_dtype), layers[0].experts)
    # The model as it ran, weighed as it would be on the profiles (at `sim_itemsize`): the
    # simulated columns use the measured run's slots where they fit the profile.
    body = of_model(model, "measured", dtype=sim_dtype)
    cpu = CpuLane.of(host_or_default(host))
    # Detach gives back the decoded (lossy) experts: every run must start from the same weights.
    pristine = None if codec.identity else [p.detach().clone() for layer in layers for p in layer.experts.parameters()]
    rows, reference, oracle_trace = [], None, None
    mask = torch.ones_like(prompt_ids)
    order = ["none"] + [p for p in predictors if p != "none"]  # the oracle replays none's trace
    for fraction, policy in itertools.product(fractions, policies):
        slots = max(top_k, min(total, round(fraction * total * spec.nbytes / codec.nbytes)))
        for predictor in order:
            if predictor not in predictors and predictor != "none":
                continue
            kwargs = dict(predictor_path=predictor_path) if predictor == "m2r2" else {}
            runtime = attach(
                model,
                device=device,
                cache_slots=slots,
                predictor=predictor,
                lookahead=lookahead,
                record=True,
                on_miss=on_miss,
                cache_policy=policy,
                experts_dtype=experts_dtype,
                **kwargs,
            )
            try:
                if predictor == "oracle":
                    runtime.predictor.load_trace(oracle_trace)
                start = time.perf_counter()
                out = model.generate(
                    prompt_ids.to(runtime.device),
                    attention_mask=mask.to(runtime.device),
                    max_new_tokens=warmup + tokens,
                    do_sample=False,
                    min_new_tokens=warmup + tokens,
                )
                wall = time.perf_counter() - start
                sequence = out.cpu()
                if reference is None:
                    reference = sequence
                same_tokens = torch.equal(sequence, reference)
                if not same_tokens and spec.dtype == torch.float32:
                    raise AssertionError(f"predictor {predictor} at {fraction} changed the output: a bug")
                if not same_tokens:  # half precision: waves round partial sums differently (1 ulp)
                    logger.warning(
                        "%s at %s: tokens differ from the first run (%s rounding)", predictor, fraction, spec.dtype
                    )
                stats = runtime.stats(flush=True)
                replay = replay_payload(runtime)  # what the simulator replays on each profile
                trace, starts = replay["trace"], replay["step_starts"]
                if predictor == "none":
                    oracle_trace = trace
            finally:
                runtime.detach()
                if pristine is not None:
                    with torch.no_grad():
                        params = [p for layer in layers for p in layer.experts.parameters()]
                        for param, saved in zip(params, pristine):
                            param.copy_(saved)
            if predictor not in predictors:
                continue
            row = {
                "on_miss": on_miss,
                "policy": policy,
                "experts_dtype": stats["experts_dtype"],
                "expert_bytes": stats["expert_bytes"],
                **_row(predictor, fraction, slots, stats, starts, wall, trace, warmup),
            }
            row["same_tokens"] = same_tokens
            fits = {
                p.name: fit(body, experts_dtype, p, host, context, cache_slots=slots, host_memory=host_memory)
                for p in profiles or []
            }
            row.update(
                cache_slots={n: f.cache_slots for n, f in fits.items()},
                measured_cache_slots=slots,
                fits={n: f.fits for n, f in fits.items()},
                device_bytes={n: f.device_bytes for n, f in fits.items()},
                host_bytes={n: f.host_bytes for n, f in fits.items()},
                simulated={},
                bound={},
                config_bound={},
                simulated_stall_share={},
            )
            for profile in profiles or []:
                sim = simulate_replay(
                    replay,
                    profile,
                    itemsize=sim_itemsize,
                    policy=policy,
                    experts=sim_experts,
                    cpu=cpu,
                    warmup=warmup,
                    kv_bytes=body.kv_bytes(fits[profile.name].context),
                )
                row["simulated"][profile.name] = sim["tokens_per_s"]
                row["bound"][profile.name] = sim["bound_tokens_per_s"]
                row["config_bound"][profile.name] = sim["config_bound_tokens_per_s"]
                row["simulated_stall_share"][profile.name] = sim["stall_share"]
                row.setdefault("cpu_bound", {})[profile.name] = sim["cpu_bound_tokens_per_s"]
            rows.append(row)
            if progress is not None:
                progress(row)
    rows += _bounds(body, experts_dtype, profiles or [], host, oracle_trace or [], warmup, context, host_memory)
    meta = {
        "experts_total": total,
        "top_k": top_k,
        "expert_bytes": spec.nbytes,
        "simulated_expert_bytes": sim_experts["bytes"],
        "experts_dtype": codec.name,
        "tokens": tokens,
        "warmup": warmup,
        "context": context,
        "moe_layers": len(layers),
        "layers": model.config.num_hidden_layers,
        "measured_on": str(runtime.device),
        "loader": stats["loader"],
        "stall_timing": stats["stall_timing"],
    }
    return {"rows": rows, "meta": meta}


def _row(predictor, fraction, slots, stats, all_starts, wall, trace, warmup: int = 0) -> dict:
    """A measured row over the decode steps after the warm-up (`warmup` tokens)."""
    starts = all_starts[warmup:]  # starts[1] is the first measured step's
    decode_wall = starts[-1] - starts[1] if len(starts) > 2 else wall
    # The stall as measured per step: CUDA events on CUDA (host time in acquire never blocks
    # there), host wait on CPU.
    stalls = stats["stall_by_step"]
    decode_wait = sum(stalls.get(step, 0.0) for step in range(warmup + 1, len(all_starts) - 1))
    return {
        "predictor": predictor,
        "cache_fraction": fraction,
        "cache_slots": slots,
        "hit_rate": stats["hit_rate"],
        "decode_hit_rate": _decode_hit_rate(trace, warmup),
        "prefetch_precision": stats["prefetch_precision"],
        # of the routed experts not already resident, the share a prefetch staged (lanes.prefetch_recall)
        "prefetch_recall": prefetch_recall(stats) or 0.0,
        "stall_share": decode_wait / decode_wall if decode_wall else 0.0,
        "tokens_per_s": _decode_tokens_per_s(starts),
        "median_token_s": statistics.median(b - a for a, b in zip(starts[1:], starts[2:])) if len(starts) > 2 else 0,
        "bytes_loaded": stats["bytes_loaded"],
        "misses": stats["misses"],
        "prefetch_issued": stats["prefetch_issued"],
        "prefetch_used": stats["prefetch_used"],
    }


def _decode_hit_rate(trace: list[dict], warmup: int = 0) -> float:
    """Device hits over every routed expert of the decode steps after the warm-up, wherever it
    ran (as `stats()["hit_rate"]`); step 0, the prefill, touches nearly every expert."""
    decode = [r for r in trace if r["step"] > warmup]
    hits = sum(r["hits"] for r in decode)
    routed = hits + sum(r["misses"] + len(r.get("host", ())) for r in decode)
    return hits / routed if routed else 0.0


def _bounds(body, experts_dtype, profiles, host, trace, warmup, context, host_memory) -> list[dict]:
    """Two reference rows per profile, with the CPU lane: every expert resident (where they all
    fit the device; None elsewhere) and on-demand loading at the link's bandwidth (top_k slots):
    1 / max(compute, distinct experts per token x expert bytes / H2D bandwidth)."""
    from .scenario import host_or_default

    decode = [r for r in trace if r["step"] > warmup]
    steps = {r["step"] for r in decode} or {1}
    distinct = sum(len(r["experts"]) for r in decode) / len(steps)
    traffic = body.experts[experts_dtype]
    cpu = CpuLane.of(host_or_default(host))
    rows = {"all-resident": {}, "bandwidth-bound-on-demand": {}}
    fits = {"all-resident": {}, "bandwidth-bound-on-demand": {}}
    for profile in profiles:
        resident = fit(
            body, experts_dtype, profile, host, context, cache_slots=body.total_experts, host_memory=host_memory
        )
        smallest = fit(body, experts_dtype, profile, host, context, cache_slots=body.top_k, host_memory=host_memory)
        roofline = Roofline(
            profile.hbm_bandwidth_bytes_per_s,
            profile.peak_bf16_flops,
            body.dense_bytes_per_layer,
            traffic["device_bytes"],
            body.expert_params,
            body.head_read_bytes,
            body.kv_bytes(resident.context) / body.num_layers,
        )
        moe = set(body.moe_layer_ids)
        compute = sum(
            max(
                roofline.dense(1) + (roofline.moe(1, body.top_k, body.top_k) if i in moe else 0.0),
                cpu.layer_s + (cpu.moe_layer_s if i in moe else 0.0),
            )
            for i in range(body.num_layers)
        )
        compute += body.head_read_bytes / profile.hbm_bandwidth_bytes_per_s + cpu.token_s
        transfer = distinct * traffic["bytes"] / profile.h2d_bandwidth_bytes_per_s
        rows["all-resident"][profile.name] = 1 / compute if resident.fits else None
        rows["bandwidth-bound-on-demand"][profile.name] = 1 / max(compute, transfer) if smallest.fits else None
        fits["all-resident"][profile.name] = resident
        fits["bandwidth-bound-on-demand"][profile.name] = smallest
    out = []
    for name, on_miss, hit in (("all-resident", "-", 1.0), ("bandwidth-bound-on-demand", "wait", 0.0)):
        sized = fits[name]
        out.append(
            {
                "on_miss": on_miss,  # a bound, not a placement
                "predictor": name,
                "experts_dtype": experts_dtype,
                "cache": None,
                "cache_fraction": 1.0 if hit else 0.0,
                "what_if": False,
                "cache_slots": {n: f.cache_slots for n, f in sized.items()},
                "fits": {n: f.fits for n, f in sized.items()},
                "device_bytes": {n: f.device_bytes for n, f in sized.items()},
                "host_bytes": {n: f.host_bytes for n, f in sized.items()},
                "hit_rate": hit,
                "prefetch_precision": None,
                "prefetch_recall": None,
                "tokens_per_s": None,
                "simulated": rows[name],
            }
        )
    return out
