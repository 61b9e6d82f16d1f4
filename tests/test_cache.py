"""The cache policy on its own: no tensors, no device."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_prefetch.errors import CacheCapacityError
from moe_prefetch.runtime.cache import ExpertCache, LRUPolicy


def make(slots=3):
    return ExpertCache(slots, expert_bytes=100, layer_ids=[0, 1])


def load(cache, key):
    slot, needs = cache.access(key)
    cache.mark_ready(slot)
    cache.unpin(slot)
    return slot, needs


def test_hits_misses_and_lru_eviction():
    cache = make(2)
    assert load(cache, (0, 1))[1] and load(cache, (0, 2))[1]
    assert not load(cache, (0, 1))[1]  # hit, and (0, 1) is now most recent
    load(cache, (0, 3))  # evicts (0, 2), the least recently used
    assert cache.lookup((0, 2)) is None and cache.lookup((0, 1)) is not None
    c = cache.counters[0]
    assert (c.hits, c.misses, c.evictions, c.bytes_loaded) == (1, 3, 1, 300)
    cache.check()


def test_pinned_and_in_flight_are_never_evicted():
    cache = make(2)
    pinned, _ = cache.access((0, 0))  # pinned, still LOADING
    cache.mark_ready(pinned)
    in_flight, _ = cache.prefetch((1, 0))  # LOADING
    with pytest.raises(CacheCapacityError, match="raise cache_slots"):
        cache.access((0, 1))
    assert cache.prefetch((1, 1)) is None
    cache.unpin(pinned)
    assert cache.access((0, 1))[0] == pinned  # now evictable
    assert cache.key_of[in_flight] == (1, 0)


def test_prefetch_used_wasted_and_protected():
    cache = make(2)
    slot, needs = cache.prefetch((1, 5))
    assert needs
    cache.mark_ready(slot)
    assert not load(cache, (1, 5))[1]
    assert cache.counters[1].prefetch_used == 1 and cache.counters[1].hits == 1
    slot, _ = cache.prefetch((1, 6))
    cache.mark_ready(slot)
    assert cache.prefetch((0, 7), protected={(1, 5), (1, 6)}) is None  # may not evict what next layers need
    cache.demote((1, 6))  # wrong prediction: first to go
    load(cache, (0, 7))
    assert cache.lookup((1, 6)) is None and cache.counters[1].prefetch_wasted == 1


def test_drop_returns_a_queued_prefetch():
    cache = make(2)
    cache.prefetch((0, 1))
    cache.drop((0, 1))
    c = cache.counters[0]
    assert (c.prefetch_issued, c.prefetch_dropped, c.prefetch_wasted, c.bytes_loaded) == (1, 1, 1, 0)
    assert cache.lookup((0, 1)) is None
    cache.check()


def test_lru_policy_order():
    policy = LRUPolicy()
    for key in [(0, 0), (0, 1), (0, 2)]:
        policy.insert(key)
    policy.touch((0, 0))
    policy.demote((0, 2))
    assert list(policy.victims()) == [(0, 2), (0, 1), (0, 0)]


ops = st.lists(
    st.tuples(st.sampled_from(["access", "prefetch", "ready", "demote"]), st.integers(0, 1), st.integers(0, 5)),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(slots=st.integers(1, 5), program=ops)
def test_properties(slots, program):
    """Capacity holds, pinned/in-flight slots survive, LRU order holds, counters add up."""
    cache = make(slots)
    accesses = 0
    order: list = []  # our own model of recency among resident keys
    for op, layer, expert in program:
        key = (layer, expert)
        if op == "access":
            loading = [s for s, st_ in enumerate(cache.state) if st_.name == "LOADING"]
            for s in loading:
                cache.mark_ready(s)
            before = dict(cache.slot_of)
            slot, needs = cache.access(key)
            accesses += 1
            assert cache.pins[slot] == 1
            if needs and len(before) == slots:
                evicted = set(before) - set(cache.slot_of)
                assert len(evicted) == 1
                # the victim is the least recent of the resident keys (demoted ones go first)
                assert evicted.pop() == next(k for k in order if k in before)
            cache.mark_ready(slot)
            cache.unpin(slot)
            order = [k for k in order if k in cache.slot_of and k != key] + [key]
        elif op == "prefetch":
            snapshot = {k: s for k, s in cache.slot_of.items() if not cache.evictable(s)}
            result = cache.prefetch(key)
            for k, s in snapshot.items():  # in-flight slots survive
                assert cache.slot_of.get(k) == s
            if result is not None and result[1]:
                order = [k for k in order if k in cache.slot_of] + [key]
            else:
                order = [k for k in order if k in cache.slot_of]
        elif op == "ready":
            for s in range(slots):
                cache.mark_ready(s)
        elif op == "demote" and key in cache.slot_of:
            cache.demote(key)
            order = [key] + [k for k in order if k != key]
        assert len(cache.slot_of) <= slots
        cache.check()
    total = cache.totals()
    assert total.hits + total.misses == accesses
    assert total.bytes_loaded == 100 * (total.misses + total.prefetch_issued - total.prefetch_dropped)
    assert total.prefetch_used + total.prefetch_wasted <= total.prefetch_issued
