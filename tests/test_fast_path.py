"""The all-resident fast path (`Scheduler.hit_all`, `ExpertCache.hit_all`): a layer call whose
routed experts are all resident and landed skips plan, pins and per-slot releases. It must
compute what the general path computes and leave the cache exactly as the general path would:
the same counters, the same eviction order (so the same victims later), the same use history,
and it must not be taken while any routed expert is absent or still loading."""

from __future__ import annotations

import copy
import random
from dataclasses import asdict

import pytest
import torch
from test_scheduler import LAYERS, Link, scheduler_with
from tiny_models import make_model, prompt

import moe_prefetch
from moe_prefetch.runtime.cache import ExpertCache, SlotState, make_policy
from moe_prefetch.runtime.loader import Loader

TIMINGS = ("stall_seconds", "blocked_seconds", "host_seconds")  # clock readings, not decisions


class SyncLoader(Loader):
    """Copies at submit, so the cache's decisions do not depend on when a thread gets to run:
    two runs of the same tokens make the same decisions, copy for copy."""

    kind = "sync"

    def submit(self, slot, src, dst, priority, tag=None):
        dst.copy_(src)

    def done(self, slot):
        return True

    def wait(self, slot, layer_idx):
        pass

    def cancel(self, slot):
        return False


def attached(stock, fast: bool, **options):
    model = copy.deepcopy(stock)
    runtime = moe_prefetch.attach(model, device="cpu", **options)
    runtime.loader.close()
    runtime.loader = runtime.scheduler.loader = SyncLoader(runtime.cache.num_slots)
    runtime.fast_path = fast
    return model, runtime


def decode(model, steps: int = 10, seed: int = 0) -> list[torch.Tensor]:
    """Logits of a prefill of batch 1 and `steps` greedy decode steps."""
    ids = prompt(batch=1, length=6, seed=seed)
    logits = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        logits.append(out.logits)
        for _ in range(steps):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
    return logits


def state(runtime) -> dict:
    """Everything the cache and scheduler decide with later, and what they counted."""
    cache, scheduler = runtime.cache, runtime.scheduler
    return {
        "counters": {
            layer: {k: v for k, v in asdict(c).items() if k not in TIMINGS} for layer, c in cache.counters.items()
        },
        "eviction_order": list(cache.policy.victims()),
        "slot_of": dict(cache.slot_of),
        "state": list(cache.state),
        "pins": list(cache.pins),
        "unused": set(cache.unused_prefetch),
        "last_used": dict(scheduler.last_used),
        "uses": {key: scheduler.value.count(key) for key in cache.slot_of},
        "trace": [(r["experts"], r["host"], r["hits"], r["misses"], r["prefetch_used"]) for r in runtime.trace],
    }


CASES = [
    pytest.param(dict(cache_slots=16), id="all-resident"),
    pytest.param(dict(cache_slots=16, cache_policy="lfu"), id="all-resident-lfu"),
    pytest.param(dict(cache_slots=12), id="evicting-lru"),
    pytest.param(dict(cache_slots=12, cache_policy="lfru"), id="evicting-lfru"),
    pytest.param(dict(cache_slots=6, predictor="next-gate", lookahead=1), id="next-gate"),
    pytest.param(dict(cache_slots=6, predictor="next-gate", lookahead=1, cache_policy="lfu"), id="next-gate-lfu"),
    pytest.param(dict(cache_slots=6, on_miss="auto", predictor="next-gate", lookahead=1), id="auto"),
]


@pytest.mark.parametrize("options", CASES)
def test_fast_path_computes_and_decides_as_the_general_path(options):
    stock = make_model("qwen3_moe")
    fast_model, fast = attached(stock, True, **options)
    slow_model, slow = attached(stock, False, **options)
    fast_logits, slow_logits = decode(fast_model), decode(slow_model)
    assert fast.stats()["fast_path_calls"] > 0, "the fast path was never taken"
    assert slow.stats()["fast_path_calls"] == 0
    for a, b in zip(fast_logits, slow_logits):
        assert torch.equal(a, b)
    for a, b in zip(fast_logits, decode(stock)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert state(fast) == state(slow)
    if options["cache_slots"] < 16:
        assert fast.stats()["evictions"] > 0, "nothing was evicted: the eviction order was never put to use"
    assert all(p == 0 for p in fast.cache.pins), "the fast path pins nothing, so it leaves nothing pinned"
    fast.cache.check()


def test_next_gate_case_uses_prefetches_on_the_fast_path():
    """The fast path meets prefetched experts (counted used there) and stale ones (demoted):
    what the comparison above must have seen to mean anything for predictions."""
    stock = make_model("qwen3_moe")
    model, runtime = attached(stock, True, cache_slots=6, predictor="next-gate", lookahead=1)
    counted = []
    hit_all = runtime.cache.hit_all

    def spy(layer_idx, experts):
        counted.append(len(runtime.cache.unused[layer_idx] & set(experts)))
        hit_all(layer_idx, experts)

    runtime.cache.hit_all = spy
    decode(model, steps=8)
    stats = runtime.stats()
    assert sum(counted) > 0, "no prefetch was used on the fast path"
    assert stats["prefetch_wasted"] > 0 and stats["evictions"] > 0


def test_fast_path_calls_count_the_calls_it_took_and_reset():
    stock = make_model("qwen3_moe")
    model, runtime = attached(stock, True, cache_slots=16)
    decode(model, steps=4)
    calls = len(runtime.trace)
    took = runtime.stats()["fast_path_calls"]
    assert 0 < took <= calls
    assert took == sum(r["misses"] == 0 for r in runtime.trace), "taken exactly when nothing was missing"
    runtime.reset_stats()
    assert runtime.stats()["fast_path_calls"] == 0


def drive(fast: bool, on_miss: str, policy: str = "lru", seed: int = 0) -> tuple[list, int, int]:
    """Thirty tokens over 4 layers of 8 experts, top-2 (sticky), 10 slots, with a prediction for the next
    layer before each (half right), copies landing at random, driven as the runtime drives the
    scheduler: through `hit_all` when `fast` and it applies, else plan, acquire and release.
    Returns what the scheduler and cache hold after each layer call, the calls `hit_all` took,
    and how many of those met a stale prediction (a prefetch for the layer it did not route)."""
    from moe_prefetch.runtime.placement import DEFAULT_COSTS, Placement

    rng = random.Random(seed)
    scheduler, link = scheduler_with(num_slots=10)
    scheduler.cache.policy = make_policy(policy)
    placement = Placement(DEFAULT_COSTS, 100, 50, on_miss=on_miss)
    scheduler.placement = placement
    assert scheduler._investing() == (on_miss != "wait"), "the case meant to count uses for uploads does not"
    cache, seen, took, stale = scheduler.cache, [], 0, 0
    routing = {layer: [0, 1] for layer in LAYERS}
    for _ in range(30):
        scheduler.new_step()
        for layer in LAYERS:
            if rng.random() < 0.4:  # sticky routing, as from token to token, so layers find all resident
                routing[layer] = sorted(rng.sample(range(8), 2))
            needed = routing[layer]
            if layer + 1 in LAYERS:
                scheduler.prefetch(layer, [(layer + 1, 1, [needed[0], rng.randrange(8)])])
            link.land(*[key for key in sorted(link.queued.values()) if rng.random() < 0.7])
            unused = set(cache.unused[layer]) - set(needed)
            slots = scheduler.hit_all(layer, needed) if fast else None
            took += slots is not None
            stale += slots is not None and bool(unused)
            if slots is None:
                host, waves = scheduler.plan(layer, needed, dict.fromkeys(needed, 1), placement)
                for wave in waves:
                    scheduler.release(scheduler.acquire(layer, wave).values())
                if host:
                    scheduler.upload(layer, host)
            else:
                link.release_all(slots)
            seen.append(
                (
                    {layer: asdict(c) for layer, c in cache.counters.items()},
                    list(cache.policy.victims()),
                    dict(cache.slot_of),
                    set(cache.unused_prefetch),
                    dict(scheduler.last_used),
                    {key: scheduler.value.count(key) for key in cache.slot_of},
                    list(link.copies),
                    list(link.cancelled),
                )
            )
    return seen, took, stale


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru"])
@pytest.mark.parametrize("on_miss", ["wait", "auto", "host"])
def test_scheduler_hit_all_decides_as_plan_and_acquire_after_every_layer(on_miss, policy):
    """Layer by layer, not only at the end: a step the fast path skipped (a stale prediction left
    undemoted, a use not counted for upload pricing) shows in the very next snapshot."""
    (fast, took, stale), (slow, none, _) = drive(True, on_miss, policy), drive(False, on_miss, policy)
    assert took > 10 and none == 0, "the fast path was never met"
    assert stale > 0 or on_miss == "host", "no stale prediction met the fast path"  # host: predictions rarely land
    for call, (a, b) in enumerate(zip(fast, slow)):
        assert a == b, f"layer call {call}: the fast path left the scheduler in another state"


def test_hit_all_is_not_taken_when_an_expert_is_absent_and_changes_nothing():
    scheduler, link = scheduler_with(num_slots=4)
    scheduler.new_step()
    for expert_id in (0, 1):
        scheduler.release(scheduler.acquire(1, [expert_id]).values())  # demand loads, landed when waited for
    before = (asdict(scheduler.cache.counters[1]), list(scheduler.cache.policy.victims()), dict(scheduler.last_used))
    assert scheduler.hit_all(1, [0, 1, 2]) is None
    after = (asdict(scheduler.cache.counters[1]), list(scheduler.cache.policy.victims()), dict(scheduler.last_used))
    assert after == before
    assert scheduler.hit_all(1, [0, 1]) is not None


def test_hit_all_is_not_taken_while_a_copy_is_in_flight():
    scheduler, link = scheduler_with(num_slots=4)
    scheduler.new_step()
    scheduler.prefetch(0, [(1, 1, [3])])  # queued, not landed
    assert scheduler.hit_all(1, [3]) is None, "a slot still loading cannot be read"
    assert scheduler.cache.counters[1].hits == 0
    link.land((1, 3))
    slots = scheduler.hit_all(1, [3])
    assert slots == [scheduler.cache.slot_of[(1, 3)]]
    counters = scheduler.cache.counters[1]
    assert (counters.hits, counters.prefetch_used, counters.misses) == (1, 1, 0)
    assert scheduler.cache.state[slots[0]] is SlotState.READY


def test_hit_all_touches_the_eviction_order_as_access_does():
    """The routed experts become the most recently used, in routing order: the next eviction
    takes the expert that was not routed, not one the fast path served."""
    cache = ExpertCache(3, expert_bytes=1, layer_ids=LAYERS)
    for expert_id in (0, 1, 2):
        slot, _ = cache.access((1, expert_id))
        cache.mark_ready(slot)
        cache.unpin(slot)
    assert cache.ready_slots(1, [0, 1]) == [cache.slot_of[(1, 0)], cache.slot_of[(1, 1)]]
    cache.hit_all(1, [0, 1])
    assert list(cache.policy.victims()) == [(1, 2), (1, 0), (1, 1)]
    cache.access((2, 0))  # a miss evicts the least recently used
    assert (1, 2) not in cache.slot_of and (1, 0) in cache.slot_of


def test_release_all_releases_each_slot_by_default():
    link = Link(4)
    link.release_all([2, 0, 3])
    assert link.released == [2, 0, 3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_release_all_shares_one_fresh_event_and_release_restores_the_slots_own():
    from moe_prefetch.runtime.loader import CudaStreamLoader

    loader = CudaStreamLoader(4, torch.device("cuda"))
    try:
        loader.release_all([0, 2])
        shared = loader._released[0]
        assert loader._released[2] is shared and loader._released[1] is loader._own_release[1]
        loader.release_all([1])
        assert loader._released[1] is not shared, "a later call records its own event"
        loader.release(0)
        assert loader._released[0] is loader._own_release[0] and loader._released[2] is shared
    finally:
        loader.close()


@pytest.mark.parametrize(
    "indices, limit",
    [([[5, 2, 7]], 3), ([[5, 2, 7]], 2), ([[5, 2], [2, 7], [7, 2]], 3), ([[1, 1, 3]], 2), ([[4, 0], [0, 4]], 1)],
)
def test_rank_of_one_vote_each_keeps_the_order_of_the_votes(indices, limit):
    """`rank`'s shortcut for distinct ids (a single token's top-k) gives what counting gives."""
    from collections import Counter

    import numpy as np

    from moe_prefetch.runtime.prediction import rank

    votes = Counter(np.asarray(indices).reshape(-1).tolist())
    assert rank(np.asarray(indices), limit) == [e for e, _ in votes.most_common(limit)]
    assert rank(torch.tensor(indices), limit) == [e for e, _ in votes.most_common(limit)]


def test_fast_path_takes_int32_routing_as_long():
    """Routers that return int32 ids reach the fast path's remap too (`torch.take` takes long only)."""
    stock = make_model("qwen3_moe")
    model, runtime = attached(stock, True, cache_slots=16)
    decode(model, steps=2)
    layer = runtime.layers[0]
    experts = sorted(runtime.cache.resident[layer.layer_idx])[: layer.top_k]
    hidden = torch.randn(1, stock.config.hidden_size)
    weights = torch.softmax(torch.randn(1, len(experts)), -1)
    before = runtime.fast_path_calls
    with torch.no_grad():
        as_long = runtime.experts_forward(layer, hidden, torch.tensor([experts]), weights)
        as_int = runtime.experts_forward(layer, hidden, torch.tensor([experts], dtype=torch.int32), weights)
    assert runtime.fast_path_calls == before + 2
    assert torch.equal(as_long, as_int)
