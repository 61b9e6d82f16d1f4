"""One configuration on named hardware, simulated at the size it fits.

The pieces `bench` (routed rows) and `plan` share: a model's routing for the simulator
(`routing_for`: a demo's recorded routing repeated over the model's layers, the model's own
recorded routing, or uniform random routing, always `warmup + tokens` decode tokens), and one
configuration (experts_dtype, cache, on_miss, eviction policy, predictor) simulated on a device
and host profile at the cache `fitting.fit` sized for it (`simulate_fit`), with the CPU lane of
the host, the KV cache read at the stated context, the warm-up, and both bounds.
"""

from __future__ import annotations

import logging

from .fitting import Fit

# No torch at import: the CLI reads DEFAULT_WARMUP for its help text.

logger = logging.getLogger(__name__)

DEFAULT_WARMUP = 32
DEFAULT_PROMPT = "import os\n\ndef main("
# Predictors whose predictions come from the model's own computation (recorded in a run); none,
# previous-token and oracle are rebuilt from the trace by the simulator.
RECORDED = ("next-gate", "m2r2")
# A checkpoint at most this big records its own routing (a CPU run); larger ones replay a demo's.
OWN_ROUTING_MAX_BYTES = 2 << 30


def host_or_default(host):
    """`host`, or the shipped desktop host the lane costs default to (`profiles.default_lane_costs`)."""
    if host is not None:
        return host
    from ..runtime.profiles import SHIPPED_DIR, read_host_profile

    return read_host_profile(SHIPPED_DIR / "host" / "ddr4-3200-2ch.toml")


def routing_for(
    anatomy,
    routing: str,
    predictors: list[str],
    tokens: int,
    warmup: int = DEFAULT_WARMUP,
    prompt: str = DEFAULT_PROMPT,
    lookahead: int = 2,
) -> tuple[dict, dict | None]:
    """(routing in the model's layer and expert ids, the recording or None) for `warmup + tokens`
    decode tokens. `routing`: 'random' (uniform), a demo name or checkpoint folder whose recorded
    routing is repeated over the model's layers (`routing.repeat_onto`, which refuses to expand a
    trace), or 'own': the model's own (`anatomy.name` must be a folder or demo)."""
    from . import routing as routes

    ids, experts, top_k = list(anatomy.moe_layer_ids), anatomy.experts_per_layer, anatomy.top_k
    steps = warmup + tokens  # decode steps after the prefill
    if routing == "random":
        return routes.random_routing(ids, experts, top_k, steps), None
    source = anatomy.name if routing == "own" else routing
    # Check before recording: a refused expansion must not cost a run.
    if routing != "own":
        from ..model.folders import read_config, resolve_path

        config = read_config(resolve_path(source)).get_text_config()
        recorded = {
            "model": source,
            "num_experts": _experts_of(config),
            "top_k": int(getattr(config, "num_experts_per_tok", 0) or 0),
        }
        routes.check_expansion(recorded, experts, top_k, anatomy.name)
    recording = routes.record(source, predictors, steps + 1, prompt, lookahead)  # N new tokens: N - 1 decode steps
    return routes.repeat_onto(recording, ids, experts, top_k), recording


def _experts_of(config) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 0


def default_routing(anatomy) -> str:
    """The routing a model is simulated with when none is named: its own for a small checkpoint
    (a CPU records it in seconds), else the shipped demo closest to it when the trace allows
    (`routing.matching_demo`), else uniform random routing."""
    from ..errors import ConfigError
    from . import routing as routes

    if not anatomy.name.startswith("shape:") and _checkpoint_bytes(anatomy.name) <= OWN_ROUTING_MAX_BYTES:
        return "own"
    demo = routes.matching_demo(anatomy.experts_per_layer, anatomy.top_k)
    demo_sizes = {"demo": (8, 2), "demo-fine": (64, 8)}[demo]
    try:
        routes.check_expansion(
            {"model": demo, "num_experts": demo_sizes[0], "top_k": demo_sizes[1]},
            anatomy.experts_per_layer,
            anatomy.top_k,
        )
    except ConfigError:
        return "random"
    return demo


def _checkpoint_bytes(model: str) -> int:
    from ..model.folders import resolve_path

    return sum(p.stat().st_size for p in resolve_path(model).glob("*.safetensors"))


def replay_of(anatomy, mapped: dict, predictor: str, cache_slots: int, lookahead: int) -> dict:
    """A `sim.simulate_replay` payload for one predictor of a model's mapped routing."""
    return {
        **anatomy.sim_sizes(),
        "trace": mapped["trace"],
        "predictions": mapped["predictions"].get(predictor, []),
        "cache_slots": cache_slots,
        "lookahead": lookahead,
        "predictor": predictor,
    }


def simulate_fit(
    anatomy,
    mapped: dict,
    fit: Fit,
    profile,
    host,
    predictor: str,
    on_miss: str = "auto",
    policy: str = "lru",
    warmup: int = DEFAULT_WARMUP,
    lookahead: int = 2,
) -> dict | None:
    """Simulate one configuration at `fit`'s cache on `profile` with `host` (None: the shipped
    desktop) for its host lane and CPU lane. None when the cache is below top_k (nothing runs)."""
    from ..runtime.profiles import default_lane_costs
    from .sim import CpuLane, simulate_replay

    if fit.cache_slots < anatomy.top_k:
        return None
    host = host_or_default(host)
    replay = replay_of(anatomy, mapped, predictor, fit.cache_slots, lookahead)
    mode = "recorded" if predictor in RECORDED else predictor
    return simulate_replay(
        replay,
        profile,
        predictor=mode,
        itemsize=anatomy.itemsize,
        on_miss=on_miss,
        costs=default_lane_costs(profile, host),
        policy=policy,
        experts=anatomy.experts[fit.experts_dtype],
        cpu=CpuLane.of(host),
        warmup=warmup,
        kv_bytes=anatomy.kv_bytes(fit.context),
    )
