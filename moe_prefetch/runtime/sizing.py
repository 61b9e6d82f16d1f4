"""How many cache slots a model needs, and the warning when a cache is below that.

Shared by `inspect` (evidence.plan.ModelSize), `attach`/`load` (a warning when the runtime is
wired) and the reports (a note when a layer never hit). No torch, so the CLI stays quick.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

RECOMMENDED_REASON = "top_k x MoE layers: every layer keeps the previous token's experts, so LRU can reuse them"


def recommended_slots(top_k: int, moe_layers: int, total_experts: int) -> int:
    """Slots for every MoE layer to keep one token's top_k experts (capped at every expert)."""
    return min(total_experts, top_k * moe_layers)


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
