"""How many cache slots a model needs, what a cache budget must cover, and the warning when a
cache is below the recommended size.

Shared by `inspect` (evidence.plan.ModelSize), `attach`/`load` (the budget check and a warning
when the runtime is wired) and the reports (a note when a layer never hit). No torch, so the CLI
stays quick. Byte counts are written one way everywhere (`fmt_bytes`), so figures that must agree
read alike.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

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
