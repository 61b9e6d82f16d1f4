"""How many cache slots a model needs, what a cache budget must cover, and the warning when a
cache is below the recommended size.

Shared by `inspect` (evidence.plan.ModelSize), `attach`/`load` (the budget check, the reserve
when the pool is sized from free memory, and a warning when the runtime is wired) and the reports
(a note when a layer never hit). No torch, so the CLI stays quick. Byte counts are written one
way everywhere (`fmt_bytes`), so figures that must agree read alike.

The reserve: the pool is made once and never grows, so everything else a run allocates on the
device must be left free before it is sized: the KV cache of the run's longest sequence (the
model's own geometry: key and value heads, MLA's compressed latent, sliding windows), the
prefill's activations (the longest prompt in one forward, the runtime's fp32 wave path
included) and cuBLAS's workspaces. The pool's own buffers (working slots, decode scratch) are
counted with the pool.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

# cuBLAS and cuBLASLt workspaces on the compute stream: torch takes 32 MiB for each on Hopper
# (CUBLAS_WORKSPACE_CONFIG ":4096:8"), less on older GPUs.
CUBLAS_WORKSPACE_BYTES = 64 << 20
# Prompt tokens per prefill forward in `moe-prefetch run` and `serve` (RuntimeConfig.prefill_chunk),
# and what `plan` sizes the prefill peak for: a long prompt no longer needs a larger reserve.
PREFILL_CHUNK = 512
# Tokens reserved for when `max_length` is not given: the model's context, at most this.
DEFAULT_MAX_LENGTH = 4096
# Layer kinds whose cache does not grow with the sequence (recurrent or linear-attention state).
_CONSTANT_STATE = ("linear_attention", "mamba", "conv", "recurrent", "gated_delta", "ssm")

RECOMMENDED_REASON = "top_k x MoE layers: every layer keeps the previous token's experts, so LRU can reuse them"
# Why a budget holds fewer slots than its bytes suggest (pool.py): the kernel runs on a layer's
# routed experts gathered into one buffer, so that buffer comes out of the budget first.
WORK_BUFFER = "a working buffer of top_k experts decoded for the kernel"


def fmt_bytes(n: float | None) -> str:
    """1536 -> '1.50 KiB'; binary units, two decimals, '-' for None."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def recommended_slots(top_k: int, moe_layers: int, total_experts: int) -> int:
    """Slots for every MoE layer to keep one token's top_k experts (capped at every expert)."""
    return min(total_experts, top_k * moe_layers)


def work_bytes(top_k: int, decoded_bytes: int, stored_bytes: int, compressed: bool) -> int:
    """Bytes of the pool's working buffer (pool.py): top_k experts decoded to the model's dtype,
    and, for compressed experts, a staging copy of their stored bytes."""
    return top_k * (decoded_bytes + (stored_bytes if compressed else 0))


def smallest_budget(top_k: int, slot_bytes: int, work: int) -> int:
    """The smallest cache_budget that runs: top_k slots and the working buffer."""
    return top_k * slot_bytes + work


def budget_shortfall(what: str, slots: int, top_k: int, slot_bytes: int, work: int, fmt: str) -> str:
    """Why `what` (e.g. "cache_budget='100KiB' (100.00 KiB)") holds only `slots` slots, with
    the smallest budget that runs, in one unit style. `fmt` names the stored format of a slot."""
    return (
        f"{what} holds {slots} slot{'' if slots == 1 else 's'} but one layer needs {top_k}: "
        f"{WORK_BUFFER} takes {fmt_bytes(work)} first, "
        f"then each slot {fmt_bytes(slot_bytes)} ({fmt}), so the smallest budget is "
        f"{fmt_bytes(smallest_budget(top_k, slot_bytes, work))}"
    )


def small_cache_warning(slots: int, top_k: int, moe_layers: int, total_experts: int) -> str | None:
    """One line when `slots` is below the recommended size, else None."""
    need = recommended_slots(top_k, moe_layers, total_experts)
    if slots >= need:
        return None
    return (
        f"the cache has {slots} slots, below top_k x MoE layers = {top_k} x {moe_layers} = {need}: each layer's "
        f"experts are evicted before the next token can reuse them, so expect a hit rate near 0%; "
        f"give the cache at least {need} slots (the size `moe-prefetch inspect` recommends)"
    )


def warn_if_small_cache(runtime) -> None:
    """Log `small_cache_warning` once, for a runtime just wired to its model."""
    layers = runtime.layers
    message = small_cache_warning(
        runtime.cache.num_slots,
        max(layer.top_k for layer in layers),
        len(layers),
        sum(layer.num_experts for layer in layers),
    )
    if message is not None:
        logger.warning(message)


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def kv_widths(decoder_layers) -> list[int | None]:
    """Per decoder layer, the values its attention caches per token, read from the model itself:
    `k_proj` and `v_proj` output features (a config cannot say when a layer kind has its own
    head count, as MiMo-V2-Flash's sliding layers do). None where a layer has no such
    projections (MLA, linear attention, recurrent layers): the config decides there."""
    widths = []
    for layer in decoder_layers:
        attention = next((getattr(layer, n) for n in ("self_attn", "attention", "attn") if hasattr(layer, n)), None)
        k, v = getattr(attention, "k_proj", None), getattr(attention, "v_proj", None)
        known = hasattr(k, "out_features") and hasattr(v, "out_features") and not hasattr(attention, "kv_lora_rank")
        widths.append(k.out_features + v.out_features if known else None)
    return widths


def kv_cache_bytes(config, itemsize: int, tokens: int, widths: list[int | None] | None = None) -> int:
    """Bytes the KV cache holds for one sequence of `tokens` tokens, from the model's config
    (the text config of a multimodal one). Per attention layer and token: keys and values of
    `num_key_value_heads` x `head_dim`, or with MLA (DeepSeek: `kv_lora_rank` set) the
    compressed latent and the rotary key (`kv_lora_rank + qk_rope_head_dim`), which is what
    transformers caches (5.17 to 5.25) before expanding them per head; indexed (sparse) attention
    adds its indexer's key (`index_head_dim`). Sliding-window layers
    hold at most `sliding_window` tokens; linear-attention and recurrent layers (constant state)
    nothing that grows. Layer kinds it does not know count as full attention (an upper bound).
    `widths` (`kv_widths` of the model's decoder layers) overrides the per-layer key + value
    width where the model's projections say it."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = _get(config, "num_attention_heads", default=1)
    hidden = _get(config, "hidden_size", default=0)
    if _get(config, "kv_lora_rank") is not None and _get(config, "qk_rope_head_dim") is not None:
        # MLA: transformers caches the compressed latent and the shared rotary key, one "head"
        per_token = _get(config, "kv_lora_rank") + _get(config, "qk_rope_head_dim")
    else:
        head_dim = _get(config, "head_dim", default=hidden // max(1, heads))
        per_token = 2 * _get(config, "num_key_value_heads", "num_attention_heads", default=1) * head_dim
    layers = _get(config, "num_hidden_layers", default=0)
    kinds = list(_get(config, "layer_types", default=()) or ())[:layers] or ["full_attention"] * layers
    window = _get(config, "sliding_window", "attention_window_size")
    index = _get(config, "index_head_dim", default=0)  # DeepSeek-V3.2's indexer caches its own key
    total = 0
    for i, kind in enumerate(kinds):
        kind = str(kind).lower()
        if any(k in kind for k in _CONSTANT_STATE):
            continue
        span = min(tokens, window) if window and ("sliding" in kind or "chunked" in kind) else tokens
        width = widths[i] if widths and i < len(widths) and widths[i] is not None else per_token
        total += span * (width + (index if "index" in kind else 0)) * itemsize
    return total


def prefill_bytes(
    config, tokens: int, itemsize: int, top_k: int, expert_params: int, context: int | None = None
) -> int:
    """Peak activations of one forward over `tokens` tokens (the longest prompt, or one prefill
    chunk of it, attending to `context` tokens: default `tokens`), beyond the KV cache: a few
    hidden-state copies, one layer's attention projections (and, in eager attention, its scores
    in fp32), the experts' working set for every routed pair (the runtime's
    waves take hidden states and the kernel's sums in fp32) and the last token's logits in fp32.
    An estimate with a margin, not a measurement: `scripts/gpu_check.py` measures the peak."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _get(config, "hidden_size", default=0)
    heads = _get(config, "num_attention_heads", default=1)
    head_dim = _get(config, "head_dim", default=hidden // max(1, heads))
    kv_heads = _get(config, "num_key_value_heads", default=heads)
    vocab = _get(config, "vocab_size", default=0)
    inter = expert_params // max(1, 3 * hidden)  # gate, up, down of one expert
    residual = 4 * tokens * hidden * itemsize  # residual, normed, attention and MoE outputs
    attention = tokens * ((heads + 2 * kv_heads) * head_dim + hidden) * itemsize
    if _get(config, "_attn_implementation") == "eager":
        attention += 2 * heads * tokens * (context or tokens) * 4  # scores and probabilities, fp32
    pairs = tokens * top_k
    # gathered fp32 inputs, gate/up and activation in the model's dtype, fp32 sums per pair;
    # the layer's fp32 accumulators per token
    experts = pairs * (2 * hidden * 4 + 3 * inter * itemsize) + 3 * tokens * hidden * 4
    logits = 2 * vocab * 4
    return residual + attention + experts + logits


def default_max_length(config) -> int:
    """Tokens reserved for when `max_length` is not given: the model's context, at most
    DEFAULT_MAX_LENGTH."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return min(DEFAULT_MAX_LENGTH, _get(text, "max_position_embeddings", default=DEFAULT_MAX_LENGTH))


@dataclass(frozen=True)
class Reserve:
    """Device bytes left free when the pool is sized from free memory, by part."""

    kv_cache: int
    prefill: int
    workspace: int
    max_length: int
    max_batch: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.prefill + self.workspace

    def describe(self) -> str:
        gib = 2**30
        return (
            f"{self.total / gib:.2f} GiB reserved: KV cache for {self.max_batch} x {self.max_length} tokens "
            f"{self.kv_cache / gib:.2f} GiB, prefill {self.prefill / gib:.2f} GiB, "
            f"cuBLAS {self.workspace / gib:.2f} GiB"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def reserve(
    config,
    itemsize: int,
    top_k: int,
    expert_params: int,
    max_length: int | None = None,
    max_batch: int = 1,
    widths: list[int | None] | None = None,
    prefill_chunk: int | None = None,
) -> Reserve:
    """What a run of `max_batch` sequences of up to `max_length` tokens (prompt and generated;
    default: the model's context, at most DEFAULT_MAX_LENGTH) needs on the device beside the
    weights and the pool: its KV cache (`widths`: see `kv_cache_bytes`), its prefill's peak
    (the whole prompt in one forward, or one `prefill_chunk` of it) and cuBLAS's workspaces."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_length = max_length or default_max_length(text)
    kv = max_batch * kv_cache_bytes(text, itemsize, max_length, widths)
    tokens = min(max_length, prefill_chunk or max_length)
    prefill = prefill_bytes(text, max_batch * tokens, itemsize, top_k, expert_params, context=max_batch * max_length)
    return Reserve(kv, prefill, CUBLAS_WORKSPACE_BYTES, max_length, max_batch)
