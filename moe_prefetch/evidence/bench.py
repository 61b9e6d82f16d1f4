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
import itertools
import logging
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..experts.compression import make_codec
from ..experts.layout import dense_bytes, find_moe_layers, spec_of
from ..model.integration import attach
from ..runtime.lanes import prefetch_recall
from .sim import Roofline, expert_traffic, replay_payload, simulate_replay

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "import os\n\ndef main("
SIM_EXPERTS_DTYPES = ("auto", "bf16", "int8", "int4")  # what a shape's rows may simulate

# Public configs of the five reference shapes, with fewer layers so a CPU can run them. Their
# weights are random, so their routing is random: say so next to every number they give.
SHAPES = {
    "mixtral-8x7b": dict(
        model_type="mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        real_layers=32,
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        moe_intermediate_size=768,
        intermediate_size=6144,
        num_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        real_layers=48,
    ),
    "olmoe-1b-7b": dict(
        model_type="olmoe",
        hidden_size=2048,
        intermediate_size=1024,
        num_experts=64,
        num_experts_per_tok=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        real_layers=16,
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2",
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        num_attention_heads=16,
        num_key_value_heads=16,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        topk_method="greedy",
        real_layers=27,
    ),
    "gpt-oss-20b": dict(
        model_type="gpt_oss",
        hidden_size=2880,
        intermediate_size=2880,
        num_local_experts=32,
        num_experts_per_tok=4,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        real_layers=24,
    ),
}


def shape_config(name: str, layers: int = 2):
    """The named shape's transformers config with `layers` decoder layers."""
    spec = dict(SHAPES[name])
    model_type = spec.pop("model_type")
    spec.pop("real_layers")
    extra = {"layer_types": ["full_attention"] * layers} if model_type == "gpt_oss" else {}
    return AutoConfig.for_model(
        model_type, vocab_size=4096, num_hidden_layers=layers, max_position_embeddings=512, **spec, **extra
    )


def shape_model(name: str, layers: int = 2, dtype=torch.bfloat16, seed: int = 0):
    """A random-weight model with the named shape's real expert size and `layers` layers."""
    config = shape_config(name, layers)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return model


def shape_sizes(name: str, layers: int | None = None, itemsize: int = 2) -> dict:
    """What the simulator needs of a shape at its real depth (or `layers`), weights at `itemsize`
    bytes per parameter, from a skeleton on the meta device (no memory, no weights)."""
    config = shape_config(name, layers or SHAPES[name]["real_layers"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    moe = find_moe_layers(model)
    scale = itemsize / 2
    per_layer, head = dense_bytes(model, moe)
    spec = spec_of(moe)
    return {
        # per experts_dtype: the bytes each lane moves or touches per expert (sim.expert_traffic)
        "experts": {d: expert_traffic(make_codec(spec, d), moe[0].experts) for d in SIM_EXPERTS_DTYPES},
        "moe_layer_ids": [layer.layer_idx for layer in moe],
        "num_layers": config.num_hidden_layers,
        "num_experts": moe[0].num_experts,
        "top_k": max(layer.top_k for layer in moe),
        "expert_params": spec_of(moe).numel,
        "itemsize": itemsize,
        "dense_bytes_per_layer": int(per_layer * scale),
        "head_bytes": int(head * scale),
    }


def shape_routing(
    name: str,
    routing: str,
    predictors: list[str],
    tokens: int,
    prompt: str = DEFAULT_PROMPT,
    lookahead: int = 2,
    layers: int | None = None,
) -> tuple[dict, dict, dict | None]:
    """(sizes, routing in the shape's ids, the recording or None) for shape `name` with
    `routing`: 'random' (uniform, as random weights give) or a demo's recorded run."""
    from . import routing as routes

    sizes = shape_sizes(name, layers)
    ids, experts, top_k = sizes["moe_layer_ids"], sizes["num_experts"], sizes["top_k"]
    if routing == "random":
        return sizes, routes.random_routing(ids, experts, top_k, tokens), None
    recording = routes.record(routing, predictors, tokens, prompt, lookahead)
    return sizes, routes.repeat_onto(recording, ids, experts, top_k), recording


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
    name: str,
    routing: str,
    predictors: list[str],
    fractions: list[float],
    tokens: int,
    profiles: list,
    prompt: str = DEFAULT_PROMPT,
    lookahead: int = 2,
    layers: int | None = None,
    progress=None,
    on_miss: list[str] | tuple[str, ...] = ("wait",),
    host=None,
    policies: list[str] | tuple[str, ...] = ("lru",),
    experts_dtypes: list[str] | tuple[str, ...] = ("auto",),
) -> dict:
    """Simulate shape `name` at its real depth on each profile, replaying the routing and
    predictions recorded from the demo `routing` ('demo' or 'demo-fine'), repeated across the
    shape's layers (rules: `moe_prefetch.evidence.routing`). Nothing is measured here: every row is
    simulated; hit rates and prefetch precision/recall are the first profile's, decode steps only.
    Each `on_miss` placement and cache eviction policy (`policies`) gets its rows; `host` (a
    HostProfile) sets the host lane's speed. Each row carries its three-lane bound per profile
    (`sim.three_lane_bound`) and the bound's ratio to the simulated tokens/s. Each of
    `experts_dtypes` simulates the experts at that dtype's sizes ("auto": bf16, the shapes' own)."""
    from ..runtime.profiles import default_lane_costs
    from .routing import RECORDED

    sizes, mapped, recording = shape_routing(name, routing, predictors, tokens, prompt, lookahead, layers)
    total = sizes["num_experts"] * len(sizes["moe_layer_ids"])
    top_k = sizes["top_k"]
    rows = []
    for dtype, fraction, policy, placement, predictor in itertools.product(
        experts_dtypes, fractions, policies, on_miss, predictors
    ):
        # A cache fraction is of the device memory bf16 experts would take: compressed experts get
        # more slots in the same bytes, as a user's fixed cache_budget gives them.
        plain = sizes["experts"]["bf16"]["bytes"]
        slots = max(top_k, min(total, round(fraction * total * plain / sizes["experts"][dtype]["bytes"])))
        replay = shape_replay(sizes, mapped, predictor, slots, lookahead)
        mode = "recorded" if predictor in RECORDED else predictor
        sims = {
            p.name: simulate_replay(
                replay,
                p,
                predictor=mode,
                itemsize=sizes["itemsize"],
                on_miss=placement,
                costs=default_lane_costs(p, host),
                policy=policy,
                experts=sizes["experts"][dtype],
            )
            for p in profiles
        }
        first = next(iter(sims.values()), None)
        row = {
            "on_miss": placement,
            "policy": policy,
            "experts_dtype": dtype,
            "expert_bytes": sizes["experts"][dtype]["bytes"],
            "predictor": predictor,
            "cache_fraction": fraction,
            "cache_slots": slots,
            "hit_rate": first["hit_rate"] if first else None,
            "decode_hit_rate": first["decode_hit_rate"] if first else None,
            "prefetch_precision": first["decode_prefetch_precision"] if first else None,
            "prefetch_recall": first["decode_prefetch_recall"] if first else None,
            "stall_share": None,
            "tokens_per_s": None,  # nothing ran on this device
            "simulated": {n: r["tokens_per_s"] for n, r in sims.items()},
            "bound": {n: r["bound_tokens_per_s"] for n, r in sims.items()},
            "bound_ratio": {n: r["bound_tokens_per_s"] / r["tokens_per_s"] for n, r in sims.items()},
            "simulated_stall_share": {n: r["stall_share"] for n, r in sims.items()},
            "simulated_host_experts_per_token": {
                n: r["host_experts"] / max(1, r["decode_tokens"] + 1) for n, r in sims.items()
            },
        }
        rows.append(row)
        if progress is not None:
            progress(row)
    expert_bytes = sizes["expert_params"] * sizes["itemsize"]
    roof = _bounds(
        profiles,
        mapped["trace"],
        sizes["moe_layer_ids"],
        expert_bytes,
        sizes["expert_params"],
        sizes["dense_bytes_per_layer"],
        sizes["head_bytes"],
        top_k,
        sizes["num_layers"],
    )
    meta = {
        "experts_total": total,
        "top_k": top_k,
        "expert_bytes": expert_bytes,
        "simulated_expert_bytes": expert_bytes,
        "tokens": tokens,
        "moe_layers": len(sizes["moe_layer_ids"]),
        "layers": sizes["num_layers"],
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
) -> dict:
    """Measure every (predictor, fraction, eviction policy) on `model`; returns {"rows": [...], "meta": {...}}.
    `experts_dtype` compresses the experts for every run (a cache fraction is then of the device
    memory the model's own experts would need, so compressed experts get more slots), and the
    simulated profiles use the compressed sizes.
    `on_miss` places the misses of the measured runs (the simulated columns replay them as
    waits: the simulator's host lane is used by the routed bench).

    Simulated profiles see the model's weights at `sim_itemsize` bytes per parameter (2: bf16,
    as on a GPU) whatever dtype ran here (often fp32 on CPU)."""
    layers = find_moe_layers(model)
    spec = spec_of(layers)
    total = sum(layer.num_experts for layer in layers)
    top_k = max(layer.top_k for layer in layers)
    scale = sim_itemsize / spec.dtype.itemsize
    per_layer_dense, head_bytes = (int(b * scale) for b in dense_bytes(model, layers))
    expert_params = spec.numel  # padded numel, within 64 elements per matrix
    codec = make_codec(spec, experts_dtype)
    sim_spec = dataclasses.replace(spec, dtype={1: torch.uint8, 2: torch.bfloat16, 4: torch.float32}[sim_itemsize])
    sim_experts = expert_traffic(make_codec(sim_spec, experts_dtype), layers[0].experts)
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
                    max_new_tokens=tokens,
                    do_sample=False,
                    min_new_tokens=tokens,
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
                **_row(predictor, fraction, slots, stats, starts, wall, trace),
            }
            row["same_tokens"] = same_tokens
            row["simulated"] = {}
            for profile in profiles or []:
                sim = simulate_replay(replay, profile, itemsize=sim_itemsize, policy=policy, experts=sim_experts)
                row["simulated"][profile.name] = sim["tokens_per_s"]
                row.setdefault("simulated_stall_share", {})[profile.name] = sim["stall_share"]
            rows.append(row)
            if progress is not None:
                progress(row)
    rows += _bounds(
        profiles or [],
        oracle_trace or [],
        layers,
        sim_experts["bytes"],
        expert_params,
        per_layer_dense,
        head_bytes,
        top_k,
        model.config.num_hidden_layers,
    )
    meta = {
        "experts_total": total,
        "top_k": top_k,
        "expert_bytes": spec.nbytes,
        "simulated_expert_bytes": sim_experts["bytes"],
        "experts_dtype": codec.name,
        "tokens": tokens,
        "moe_layers": len(layers),
        "layers": model.config.num_hidden_layers,
        "measured_on": str(runtime.device),
        "loader": stats["loader"],
        "stall_timing": stats["stall_timing"],
    }
    return {"rows": rows, "meta": meta}


def _row(predictor, fraction, slots, stats, starts, wall, trace) -> dict:
    decode_wall = starts[-1] - starts[1] if len(starts) > 2 else wall
    # The stall as measured per step: CUDA events on CUDA (host time in acquire never blocks
    # there), host wait on CPU.
    stalls = stats["stall_by_step"]
    decode_wait = sum(stalls.get(step, 0.0) for step in range(1, len(starts) - 1))
    return {
        "predictor": predictor,
        "cache_fraction": fraction,
        "cache_slots": slots,
        "hit_rate": stats["hit_rate"],
        "decode_hit_rate": _decode_hit_rate(trace),
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


def _decode_hit_rate(trace: list[dict]) -> float:
    """Device hits over every routed expert of the decode steps, wherever it ran (as
    `stats()["hit_rate"]`); step 0, the prefill, touches nearly every expert."""
    decode = [r for r in trace if r["step"] >= 1]
    hits = sum(r["hits"] for r in decode)
    routed = hits + sum(r["misses"] + len(r.get("host", ())) for r in decode)
    return hits / routed if routed else 0.0


def _bounds(
    profiles, trace, layers, expert_bytes, expert_params, per_layer_dense, head_bytes, top_k, num_layers
) -> list[dict]:
    """All-experts-resident tokens/s (compute only) and the on-demand bandwidth bound per profile:
    1 / max(compute, distinct experts per token x expert bytes / H2D bandwidth)."""
    decode = [r for r in trace if r["step"] >= 1]
    steps = {r["step"] for r in decode} or {1}
    distinct = sum(len(r["experts"]) for r in decode) / len(steps)
    resident, bound = {}, {}
    for profile in profiles:
        roofline = Roofline(
            profile.hbm_bandwidth_bytes_per_s,
            profile.peak_bf16_flops,
            per_layer_dense,
            expert_bytes,
            expert_params,
            head_bytes,
        )
        compute = (
            num_layers * roofline.dense(1)
            + head_bytes / profile.hbm_bandwidth_bytes_per_s
            + sum(roofline.moe(1, top_k, top_k) for _ in layers)
        )
        transfer = distinct * expert_bytes / profile.h2d_bandwidth_bytes_per_s
        resident[profile.name] = 1 / compute
        bound[profile.name] = 1 / max(compute, transfer)
    return [
        {
            "on_miss": "-",  # a bound, not a placement
            "predictor": "all-resident",
            "cache_fraction": 1.0,
            "hit_rate": 1.0,
            "prefetch_precision": None,
            "prefetch_recall": None,
            "tokens_per_s": None,
            "simulated": resident,
        },
        {
            "on_miss": "wait",
            "predictor": "bandwidth-bound-on-demand",
            "cache_fraction": 0.0,
            "hit_rate": 0.0,
            "prefetch_precision": None,
            "prefetch_recall": None,
            "tokens_per_s": None,
            "simulated": bound,
        },
    ]
