"""Routing for reference shapes: a trained demo's recorded routing, or random routing.

A reference shape (`bench.SHAPES`) has a real model's expert sizes but random weights, so its
own router picks experts at random and predictors have nothing to learn. A routing-driven
shape instead replays what a trained model did: the routing trace and the next-gate / M2R2
predictions of a demo run (`record`), mapped onto the shape's MoE layers and experts
(`repeat_onto`), then simulated on the shape's sizes (`bench.run_routed_bench`).

Mapping rules (documented in docs/benchmarks.md, "Routing-driven shapes"):

- layers: the shape's j-th MoE layer replays the trace's MoE layer j mod T (T: the trace's MoE
  layers), so a 6-layer trace repeats 8 times over 48 layers. A prediction made at trace layer
  l for trace layer t replays at the same offset within each copy; at a seam between copies
  the first layers of a copy get no prediction from the copy before (the demo's own first
  layer has none either).
- experts: with at least as many experts as the trace, trace expert e is shape expert e (a
  64-expert trace on a 128-expert shape leaves ids 64..127 unrouted, so each layer's working
  set is the trace's); with fewer, e becomes e mod E.
- top-k: with a smaller top-k than the trace (6 or 4 from 8), each decode token keeps the k of
  its experts that rank highest in a fixed per-layer random order of the trace's experts
  (so two tokens sharing experts keep sharing them), predictions keep the same share of their
  experts by the same order; prefill records keep the union (they are not per token).

What is refused (`check_expansion`): a trace never grows. A shape routing more experts per token
than the trace recorded would replay the trace's top-k as its own (Qwen3's top-8 from the demo's
top-2: each token reads a quarter of its experts, and hits read 98%), and a shape with more than
MAX_WIDENING times the trace's experts per layer would route a sliver of its experts (the demo's
8 on OLMoE's 64). Fine-grained shapes replay `demo-fine` (64 experts, top-8); its 64 experts on
Qwen3's 128 per layer (2x) are allowed and said: the working set per layer is the trace's, so
hit rates at caches above half of every expert read high.

Repeating layers: a 6-layer trace over 48 layers gives 8 identical copies of each layer's routing,
so a token's misses come in step across the copies (`novelty_correlation` measures it; docs/
benchmarks.md section 5 compares a trace repeated with the whole): bursts the link sees at once,
where a real model's layers change their experts more independently.
"""

from __future__ import annotations

import logging
import math
import random

logger = logging.getLogger(__name__)

ROUTINGS = ("random", "demo", "demo-fine")
# A shape may have at most this many times the trace's experts per layer: its working set per
# layer is then at least half of what it would route (see the module docstring).
MAX_WIDENING = 2
# Predictors whose predictions come from the model's own computation, so a run records them;
# none, previous-token and oracle are rebuilt from the trace by the simulator.
RECORDED = ("next-gate", "m2r2")
PREDICTORS = ("none", "previous-token", "next-gate", "m2r2", "oracle")


def matching_demo(num_experts: int, top_k: int) -> str:
    """The shipped demo closest to a shape: 'demo' for 8 experts top-2, else 'demo-fine'."""
    return "demo" if num_experts <= 16 and top_k <= 2 else "demo-fine"


def record(
    model: str,
    predictors: list[str],
    tokens: int,
    prompt: str,
    lookahead: int,
    device: str = "cpu",
) -> dict:
    """Greedy-generate `tokens` from `prompt` with `model` (a demo name or folder), all experts
    resident, once per recorded predictor (once with none if there is none to record).

    Returns {"trace", "predictions": {predictor: [...]}, "num_experts", "top_k", "moe_layer_ids",
    "model"}; the trace keeps each record's step, layer_idx, tokens and experts."""
    from transformers import AutoTokenizer

    from ..model.integration import attach
    from ..model.loading import load, resolve_path

    folder = resolve_path(model)
    _, runtime = load(folder, device=device, cache_slots=None)
    stock = runtime.detach()
    ids = AutoTokenizer.from_pretrained(str(folder))(prompt, return_tensors="pt")["input_ids"]
    layers_total = sum(layer.num_experts for layer in runtime.layers)
    out: dict = {"predictions": {}, "model": model}
    for predictor in [p for p in predictors if p in RECORDED] or ["none"]:
        kwargs = {"predictor_path": str(folder / "m2r2_adapters.safetensors")} if predictor == "m2r2" else {}
        run = attach(stock, device=device, cache_slots=layers_total, predictor=predictor, lookahead=lookahead, **kwargs)
        try:
            stock.generate(
                ids.to(run.device),
                attention_mask=ids.new_ones(ids.shape).to(run.device),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )
            trace = [{k: r[k] for k in ("step", "layer_idx", "tokens", "experts")} for r in run.trace]
            predictions = [{**p, "predictions": [list(x) for x in p["predictions"]]} for p in run.predictions]
            moe_layer_ids = list(run.moe_layer_ids)
            num_experts = max(layer.num_experts for layer in run.layers)
            top_k = max(layer.top_k for layer in run.layers)
        finally:
            run.detach()
        if "trace" in out and out["trace"] != trace:
            raise AssertionError("the routing changed between predictors: offloading changed the output, a bug")
        out.update(trace=trace, moe_layer_ids=moe_layer_ids, num_experts=num_experts, top_k=top_k)
        if predictor != "none":
            out["predictions"][predictor] = predictions
    return out


def check_expansion(recording: dict, num_experts: int, top_k: int, shape: str = "the shape") -> None:
    """Refuse to replay `recording` onto more experts per token, or more than MAX_WIDENING times
    its experts per layer: the replay would invent routing the trace never recorded."""
    from ..errors import ConfigError

    src_experts, src_top_k = recording["num_experts"], recording["top_k"]
    name = recording.get("model", "the trace")
    if top_k > src_top_k:
        raise ConfigError(
            f"{name} routes {src_top_k} experts per token and {shape} routes {top_k}: replaying it would read "
            f"{src_top_k} of {top_k} experts per token; use --routing demo-fine (top-8) or --routing random"
        )
    if num_experts > MAX_WIDENING * src_experts:
        raise ConfigError(
            f"{name} has {src_experts} experts per layer and {shape} has {num_experts}: replaying it would route "
            f"only {src_experts} of them; use --routing demo-fine (64 experts) or --routing random"
        )


def _priority(num_experts: int, seed: int) -> dict[int, int]:
    """A fixed random order of a layer's experts: expert id -> rank (0 first)."""
    order = list(range(num_experts))
    random.Random(seed).shuffle(order)
    return {e: rank for rank, e in enumerate(order)}


def _map_experts(experts: list[int], num_experts: int, keep: int | None, rank: dict[int, int]) -> list[int]:
    """Trace expert ids -> shape expert ids (fold by `mod num_experts`), at most `keep` of them,
    chosen by `rank` (None: all, in the given order)."""
    if keep is not None:
        experts = sorted(experts, key=lambda e: rank[e])
    out: list[int] = []
    for e in experts:
        mapped = e % num_experts
        if mapped not in out:
            out.append(mapped)
        if keep is not None and len(out) == keep:
            break
    return out


def repeat_onto(recording: dict, moe_layer_ids: list[int], num_experts: int, top_k: int, seed: int = 0) -> dict:
    """Map a recording (`record`) onto a shape with these MoE layers, experts and top-k.

    Returns {"trace", "predictions": {predictor: [...]}} in the shape's layer and expert ids.
    Raises ConfigError when the shape would need routing the trace never recorded (`check_expansion`)."""
    check_expansion(recording, num_experts, top_k)
    src_ids = list(recording["moe_layer_ids"])
    period = len(src_ids)
    index_of = {layer: i for i, layer in enumerate(src_ids)}
    src_experts, src_top_k = recording["num_experts"], recording["top_k"]
    reduce = top_k < src_top_k
    ranks = [_priority(src_experts, seed * 100_003 + j) for j in range(len(moe_layer_ids))] if reduce else None
    by_source: dict[int, list[dict]] = {}
    for r in recording["trace"]:
        by_source.setdefault(index_of[r["layer_idx"]], []).append(r)
    trace = []
    for j, layer_idx in enumerate(moe_layer_ids):
        rank = ranks[j] if reduce else {}
        for r in by_source.get(j % period, []):
            keep = top_k if reduce and r["tokens"] == 1 else None
            experts = sorted(_map_experts(r["experts"], num_experts, keep, rank))
            trace.append({"step": r["step"], "layer_idx": layer_idx, "tokens": r["tokens"], "experts": experts})
    trace.sort(key=lambda r: (r["step"], r["layer_idx"]))
    predictions: dict[str, list[dict]] = {}
    for name, recorded in recording["predictions"].items():
        out = []
        for p in recorded:
            if p["layer_idx"] not in index_of:  # made at a dense layer: no counterpart in a shape
                continue
            src = index_of[p["layer_idx"]]
            for copy_start in range(0, len(moe_layer_ids), period):
                j = copy_start + src
                if j >= len(moe_layer_ids):
                    break
                said = []
                for target, distance, experts in p["predictions"]:
                    jt = copy_start + index_of[target]
                    if jt >= len(moe_layer_ids):
                        continue
                    keep = math.ceil(len(experts) * top_k / src_top_k) if reduce else None
                    mapped = _map_experts(list(experts), num_experts, keep, ranks[jt] if reduce else {})
                    said.append([moe_layer_ids[jt], distance, mapped])
                if said:
                    out.append({"step": p["step"], "layer_idx": moe_layer_ids[j], "predictions": said})
        out.sort(key=lambda p: (p["step"], p["layer_idx"]))
        predictions[name] = out
    return {"trace": trace, "predictions": predictions}


def sub_recording(recording: dict, layer_ids: list[int]) -> dict:
    """The part of a recording on MoE layers `layer_ids` (predictions made and aimed within them),
    to be repeated with `repeat_onto`: how a shorter trace repeated compares with the whole."""
    keep = set(layer_ids)
    predictions = {}
    for name, recorded in recording["predictions"].items():
        predictions[name] = [
            {**p, "predictions": [x for x in p["predictions"] if x[0] in keep]}
            for p in recorded
            if p["layer_idx"] in keep and any(x[0] in keep for x in p["predictions"])
        ]
    return {
        **recording,
        "moe_layer_ids": [layer for layer in recording["moe_layer_ids"] if layer in keep],
        "trace": [r for r in recording["trace"] if r["layer_idx"] in keep],
        "predictions": predictions,
    }


def random_routing(
    moe_layer_ids: list[int], num_experts: int, top_k: int, tokens: int, prompt_tokens: int = 16, seed: int = 0
) -> dict:
    """Uniformly random routing, as a random-weight shape's router gives: a prefill step of
    `prompt_tokens` tokens, then `tokens` decode steps of one token each."""
    rng = random.Random(seed)
    trace = []
    for step in range(tokens + 1):
        count = prompt_tokens if step == 0 else 1
        for layer_idx in moe_layer_ids:
            experts = set()
            for _ in range(count):
                experts.update(rng.sample(range(num_experts), top_k))
            trace.append({"step": step, "layer_idx": layer_idx, "tokens": count, "experts": sorted(experts)})
    return {"trace": trace, "predictions": {}}


def novelty_correlation(trace: list[dict]) -> dict:
    """How alike the layers' routing changes are from token to token (cross-layer regularity).

    Per decode step and layer, the novelty is the number of experts not routed to in the
    step before. Returns the mean Pearson correlation of novelty over all pairs of distinct
    layers, and the share of pairs whose routing is identical at every step (repeated copies)."""
    by_layer: dict[int, dict[int, set]] = {}
    for r in trace:
        by_layer.setdefault(r["layer_idx"], {})[r["step"]] = set(r["experts"])
    layers = sorted(by_layer)
    steps = sorted({s for per in by_layer.values() for s in per if s >= 2})
    novelty = {layer: [len(by_layer[layer][s] - by_layer[layer].get(s - 1, set())) for s in steps] for layer in layers}
    corrs, identical = [], 0
    for a in range(len(layers)):
        for b in range(a + 1, len(layers)):
            x, y = novelty[layers[a]], novelty[layers[b]]
            corrs.append(_pearson(x, y))
            identical += all(by_layer[layers[a]][s] == by_layer[layers[b]][s] for s in steps)
    pairs = len(corrs)
    return {
        "layers": len(layers),
        "mean_novelty_correlation": sum(corrs) / pairs if pairs else 0.0,
        "identical_pairs": identical / pairs if pairs else 0.0,
    }


def _pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sx = math.sqrt(sum((v - mx) ** 2 for v in x))
    sy = math.sqrt(sum((v - my) ** 2 for v in y))
    if sx == 0 or sy == 0:
        return 0.0
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy)
