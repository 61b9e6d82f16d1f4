"""`plan`: what to run on this card with this RAM, every option sized and simulated.

For one model (a checkpoint folder, a demo or a reference shape) on one device profile and one
host profile, every experts_dtype x on_miss x predictor that applies (m2r2 only where the
model has adapters; the oracle's row wherever the trace allows, so each predictor's share of the
best possible gain shows) gets: the largest cache that fits (`fitting.fit`), the device and host
bytes it takes, whether it fits, the steady-state simulated tokens/s, the replay's three-lane
bound and the configuration's bound (Belady's MIN). The recommendation is the fastest option
that fits and can run (not the oracle), preferring more precise experts within 5% of the
fastest, with its reason in one line and the `moe-prefetch run` command that applies it.
Every figure here is simulated; nothing runs on the device.

`ModelSize` and `model_size` are the byte counts `inspect` and `load`'s budget check share (the
smallest cache budget, on a GPU and on a CPU device); what fits where is `fitting`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.sizing import RECOMMENDED_REASON, recommended_slots, smallest_budget, work_bytes
from .fitting import DEFAULT_CONTEXT, fit, stores_that_fit
from .scenario import DEFAULT_WARMUP, default_routing, host_or_default, routing_for, simulate_fit

logger = logging.getLogger(__name__)

ON_MISS = ("wait", "host", "auto")
# In the order a tie prefers: more precise experts, simpler predictors.
DTYPES = ("auto", "bf16", "int8", "int4")
PREDICTORS = ("none", "previous-token", "next-gate", "m2r2", "oracle")
RUNNABLE = ("none", "previous-token", "next-gate", "m2r2")  # the oracle needs the future: a bound, not a choice
# A more precise experts_dtype is recommended over a faster, less precise one within this share.
PRECISION_MARGIN = 0.05
NOTE = (
    "every figure is simulated (the runtime's own cache and scheduler replaying recorded routing on the profiles' "
    "links and roofline compute, with the host's CPU lane); nothing was measured on this device"
)


def dtypes_of(anatomy) -> list[str]:
    """The experts_dtypes worth comparing: the model's own ('auto'), then bf16, int8, int4, each
    only once per size (a bf16 model's 'auto' is its bf16; a shape's own is bf16)."""
    seen, out = set(), []
    for d in DTYPES[1:] if anatomy.name.startswith("shape:") else DTYPES:
        size = anatomy.expert_bytes(d)
        if size in seen:
            continue
        seen.add(size)
        out.append(d)
    return out


def predictors_of(anatomy) -> list[str]:
    """Predictors that apply: m2r2 only where the checkpoint has trained adapters."""
    from ..model.folders import resolve_path

    if anatomy.name.startswith("shape:"):
        return [p for p in PREDICTORS if p != "m2r2"]  # a shape has no adapters of its own
    has = (resolve_path(anatomy.name) / "m2r2_adapters.safetensors").is_file()
    return [p for p in PREDICTORS if p != "m2r2" or has]


def plan(
    model: str,
    profile,
    host=None,
    context: int = DEFAULT_CONTEXT,
    host_memory: int | None = None,
    routing: str | None = None,
    tokens: int = 32,
    warmup: int = DEFAULT_WARMUP,
    lookahead: int = 2,
    progress=None,
) -> dict:
    """Every option for `model` on `profile` and `host` (None: the shipped desktop host), and the
    recommendation: {"model", "profile", "host", ..., "options": [...], "recommended": {...} or None}."""
    from . import routing as routes
    from .anatomy import anatomy

    body = anatomy(model)
    host = host_or_default(host)
    routing = routing or default_routing(body)
    predictors = predictors_of(body)
    if routing == "random":
        predictors = [p for p in predictors if p not in routes.RECORDED]  # nothing recorded to replay
    mapped, _ = routing_for(body, routing, predictors, tokens, warmup, lookahead=lookahead)
    options = []
    for dtype in dtypes_of(body):
        sized = fit(body, dtype, profile, host, context, host_memory=host_memory)
        for on_miss in ON_MISS:
            for predictor in predictors:
                option = _option(body, mapped, sized, profile, host, predictor, on_miss, warmup, lookahead)
                options.append(option)
                if progress is not None:
                    progress(option)
    _oracle_shares(options)
    recommended = recommend(options)
    if recommended is not None:
        recommended = {
            **recommended,
            "command": command(model, body, host, recommended, lookahead),
            "reason": reason(recommended, options, body, host, host_memory),
        }
    return {
        "model": model,
        "profile": profile.name,
        "host": host.name,
        "host_memory": host_memory,
        "context": options[0]["context"] if options else context,
        "routing": routing,
        "tokens": tokens,
        "warmup": warmup,
        "measured_on": "simulated",
        "note": NOTE,
        "stores_that_fit": stores_that_fit(body, host, host_memory),
        "options": options,
        "recommended": recommended,
    }


def _option(body, mapped, sized, profile, host, predictor, on_miss, warmup, lookahead) -> dict:
    """One option's row: sized, and simulated where its cache holds a layer's experts."""
    result = None
    if sized.fits:  # a configuration that cannot exist gets no figure (`--host-memory` asks what more would do)
        result = simulate_fit(body, mapped, sized, profile, host, predictor, on_miss, "lru", warmup, lookahead)
    value = (lambda key: None) if result is None else result.get  # noqa: E731
    return {
        "experts_dtype": sized.experts_dtype,
        "on_miss": on_miss,
        "predictor": predictor,
        "cache_slots": sized.cache_slots,
        "total_experts": sized.total_experts,
        "device_bytes": sized.device_bytes,
        "host_bytes": sized.host_bytes,
        "fits": sized.fits,
        "why_not": sized.why_not,
        "context": sized.context,
        "simulated_tokens_per_s": value("tokens_per_s"),
        "cold_start_tokens_per_s": value("cold_start_tokens_per_s"),
        "bound_tokens_per_s": value("bound_tokens_per_s"),
        "config_bound_tokens_per_s": value("config_bound_tokens_per_s"),
        "cpu_bound_tokens_per_s": value("cpu_bound_tokens_per_s"),
        "decode_hit_rate": value("decode_hit_rate"),
        "measured_on": "simulated",
    }


def _oracle_shares(options: list[dict]) -> None:
    """Each predictor's share of the gain the oracle gets over no prediction, per dtype and on_miss."""
    index = {(o["experts_dtype"], o["on_miss"], o["predictor"]): o for o in options}
    for o in options:
        none = index.get((o["experts_dtype"], o["on_miss"], "none"), {}).get("simulated_tokens_per_s")
        oracle = index.get((o["experts_dtype"], o["on_miss"], "oracle"), {}).get("simulated_tokens_per_s")
        mine = o["simulated_tokens_per_s"]
        gain = None if None in (none, oracle, mine) else oracle - none
        o["oracle_share"] = (mine - none) / gain if gain and gain > 1e-9 * oracle else None


def recommend(options: list[dict]) -> dict | None:
    """The fastest option that fits and can run; within PRECISION_MARGIN of it, the most precise
    experts_dtype, then the simplest predictor and placement."""
    runnable = [o for o in options if o["fits"] and o["predictor"] in RUNNABLE and o["simulated_tokens_per_s"]]
    if not runnable:
        return None
    best = max(o["simulated_tokens_per_s"] for o in runnable)
    close = [o for o in runnable if o["simulated_tokens_per_s"] >= (1 - PRECISION_MARGIN) * best]
    precise = min(DTYPES.index(o["experts_dtype"]) for o in close)
    close = [o for o in close if DTYPES.index(o["experts_dtype"]) == precise]
    top = max(o["simulated_tokens_per_s"] for o in close)
    # Among the same dtype, the fastest; a tie (within 1%) goes to the simpler predictor and placement.
    ties = [o for o in close if o["simulated_tokens_per_s"] >= 0.99 * top]
    return min(ties, key=lambda o: (PREDICTORS.index(o["predictor"]), ON_MISS.index(o["on_miss"])))


def command(model: str, body, host, option: dict, lookahead: int) -> str:
    """The `moe-prefetch run` line that applies `option` (a shape names the real model's folder)."""
    target = model
    if model.startswith("shape:"):
        from .shapes import SHAPES

        target = "./" + SHAPES[model.split(":", 1)[1]]["hub"].split("/")[-1]
    parts = ["moe-prefetch run", f"--model {target}"]
    if option["experts_dtype"] != "auto":
        parts.append(f"--experts-dtype {option['experts_dtype']}")
    parts += [
        f"--cache-slots {option['cache_slots']}",
        f"--on-miss {option['on_miss']}",
        f"--predictor {option['predictor']}",
    ]
    if option["predictor"] != "none":
        parts.append(f"--lookahead {lookahead}")
    parts.append(f"--host {host.name}")
    return " ".join(parts)


def reason(option: dict, options: list[dict], body, host, host_memory) -> str:
    """One line: why this option."""
    fitting = [o for o in options if o["fits"] and o["predictor"] in RUNNABLE and o["simulated_tokens_per_s"]]
    fastest = max(fitting, key=lambda o: o["simulated_tokens_per_s"])
    text = (
        f"{option['experts_dtype']} experts, {option['cache_slots']} of {option['total_experts']} cached, misses "
        f"{_placement(option['on_miss'])}, predictor {option['predictor']}: {option['simulated_tokens_per_s']:.1f} "
        f"tok/s simulated, the fastest of {len(fitting)} runnable options that fit"
    )
    if fastest["experts_dtype"] != option["experts_dtype"]:
        text += (
            f" within {PRECISION_MARGIN:.0%}, with more precise experts than the fastest "
            f"({fastest['experts_dtype']}, {fastest['simulated_tokens_per_s']:.1f})"
        )
    unfit = sorted({o["experts_dtype"] for o in options if not o["fits"]}, key=DTYPES.index)
    if unfit:
        text += f"; {', '.join(unfit)} do not fit ({next(o['why_not'] for o in options if not o['fits'])})"
    cpu = option.get("cpu_bound_tokens_per_s")
    if cpu and option["simulated_tokens_per_s"] >= 0.9 * cpu:
        text += f"; the CPU lane caps this host at {cpu:.1f} tok/s"
    return text


def _placement(on_miss: str) -> str:
    return {"wait": "wait for their upload", "host": "run on the host", "auto": "run where they finish first"}[on_miss]


@dataclass(frozen=True)
class ModelSize:
    """A model's anatomy and byte counts, from its config alone (no weights read)."""

    path: str
    model_type: str
    architecture: str
    dtype: str  # the dtype sizes are given in: the checkpoint's, as it would run on CUDA
    num_layers: int  # decoder layers
    moe_layers: int
    experts_per_layer: int
    top_k: int
    expert_bytes: int
    non_expert_bytes: int  # every parameter outside the experts (embeddings, attention, norms, routers)
    # Bytes of one expert as stored and moved, by experts_dtype (compression.make_codec); "auto" is
    # the checkpoint's own format. Not hashed: a dict.
    expert_bytes_by_dtype: dict[str, int] = field(default_factory=dict, hash=False, compare=False)
    # The pool's working buffer by experts_dtype (sizing.work_bytes): a cache budget pays it first.
    work_bytes_by_dtype: dict[str, int] = field(default_factory=dict, hash=False, compare=False)
    # On a CPU device the model runs in float32 (folders.default_dtype), so its sizes differ:
    # (bytes per expert, working buffer) by experts_dtype there.
    cpu_bytes_by_dtype: dict[str, tuple[int, int]] = field(default_factory=dict, hash=False, compare=False)
    experts_dtype: str = "auto"  # the experts_dtype expert_bytes is given for

    def for_dtype(self, experts_dtype: str) -> ModelSize:
        """The same model with its experts stored as `experts_dtype`: slots and fits use those bytes."""
        return dataclasses.replace(
            self, expert_bytes=self.expert_bytes_by_dtype[experts_dtype], experts_dtype=experts_dtype
        )

    @property
    def work_bytes(self) -> int:
        return self.work_bytes_by_dtype.get(self.experts_dtype, 0)

    def smallest_budget(self, cpu: bool = False) -> int:
        """The smallest cache_budget that runs (top_k slots and the working buffer), as load
        checks it: on a GPU in `dtype`, or on a CPU device (`cpu`) in float32."""
        slot, work = self.cpu_bytes_by_dtype[self.experts_dtype] if cpu else (self.expert_bytes, self.work_bytes)
        return smallest_budget(self.min_slots, slot, work)

    @property
    def total_experts(self) -> int:
        return self.moe_layers * self.experts_per_layer

    @property
    def expert_total_bytes(self) -> int:
        return self.total_experts * self.expert_bytes

    @property
    def min_slots(self) -> int:
        return self.top_k

    @property
    def recommended_slots(self) -> tuple[int, str]:
        """Slots to aim for, and why."""
        return recommended_slots(self.top_k, self.moe_layers, self.total_experts), RECOMMENDED_REASON

    @property
    def all_miss_bytes_per_token(self) -> int:
        return self.top_k * self.moe_layers * self.expert_bytes


def model_size(path: str | Path) -> ModelSize:
    """Size a checkpoint folder (or "demo") from config.json, building it on the meta device."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..errors import UnsupportedModelError
    from ..experts.compression import make_codec
    from ..experts.dtypes import EXPERTS_DTYPES
    from ..experts.layout import find_moe_layers, spec_of
    from ..experts.native import expected_formats
    from ..model.folders import default_dtype, read_config, resolve_path

    if str(path).startswith("shape:"):  # a reference shape at its real depth, vocabulary and tying
        from .shapes import SHAPES, shape_config

        name = str(path).split(":", 1)[1]
        folder, config = path, shape_config(name, SHAPES[name]["real_layers"], real=True)
    else:
        folder = resolve_path(path)
        config = read_config(folder)
    dtype = default_dtype(config, torch.device("cuda"), None)  # what load() picks on a GPU
    with init_empty_weights():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as err:
            raise UnsupportedModelError(f"transformers cannot build this model: {str(err).splitlines()[0]}") from None
    model.tie_weights()  # accelerate's empty init leaves tied tensors apart: count a tied head once
    layers = find_moe_layers(model)
    spec = spec_of(layers)
    native = expected_formats(config, spec)  # a quantized checkpoint's experts keep its format
    top_k = max(layer.top_k for layer in layers)

    def sizes(spec) -> dict[str, tuple[int, int]]:
        """(stored bytes, working buffer) per experts_dtype for experts decoded to spec.dtype."""
        codecs = {d: make_codec(spec, d, native) for d in EXPERTS_DTYPES}
        return {d: (c.nbytes, work_bytes(top_k, spec.nbytes, c.nbytes, not c.identity)) for d, c in codecs.items()}

    on_gpu = sizes(spec)
    by_dtype = {d: stored for d, (stored, _) in on_gpu.items()}
    expert_params = {id(p) for layer in layers for p in layer.experts.parameters(recurse=False)}
    non_expert = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_params)
    return ModelSize(
        path=str(folder),
        model_type=str(getattr(config, "model_type", "?")),
        architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
        dtype=str(dtype).removeprefix("torch."),
        num_layers=int(getattr(config, "num_hidden_layers", len(layers))),
        moe_layers=len(layers),
        experts_per_layer=max(layer.num_experts for layer in layers),
        top_k=top_k,
        expert_bytes=by_dtype["auto"],  # as load stores them by default: native formats stay packed
        non_expert_bytes=int(non_expert),
        expert_bytes_by_dtype=by_dtype,
        work_bytes_by_dtype={d: work for d, (_, work) in on_gpu.items()},
        cpu_bytes_by_dtype=sizes(dataclasses.replace(spec, dtype=torch.float32)),
    )
