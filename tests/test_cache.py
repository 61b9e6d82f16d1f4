"""The cache policy on its own: no tensors, no device."""

from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_prefetch.errors import CacheCapacityError
from moe_prefetch.runtime.cache import PREFETCH_VICTIM_WALK, Counters, ExpertCache, LFUPolicy, LRUPolicy, SlotState


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


# -- slot choice, counters and the lazy walk, one rule at a time -----------------------------------
def test_a_layer_fills_the_free_slots_from_its_home_then_the_nearest_below():
    cache = ExpertCache(4, expert_bytes=1, layer_ids=[0, 1])  # homes: layer 0 at slot 0, layer 1 at slot 2
    assert [cache.access((1, e))[0] for e in range(3)] == [2, 3, 1]
    assert cache.access((0, 0))[0] == 0
    cache = ExpertCache(6, expert_bytes=1, layer_ids=[3, 5, 7])  # homes 0, 2, 4
    assert cache.access((7, 0))[0] == 4 and cache.access((5, 0))[0] == 2 and cache.access((3, 0))[0] == 0
    cache = ExpertCache(4, expert_bytes=1, layer_ids=[0, 1, 2])  # homes 0, 1, 2: whole slots, rounded down
    assert cache.access((1, 0))[0] == 1 and cache.access((2, 0))[0] == 2


def test_a_dropped_slot_is_free_again_in_order():
    cache = ExpertCache(3, expert_bytes=1, layer_ids=[0])
    slots = [cache.prefetch((0, e))[0] for e in range(3)]
    cache.drop((0, 1))
    assert cache.access((0, 9)) == (slots[1], True)
    cache.drop((0, 0))
    cache.drop((0, 2))
    assert cache._free == [0, 2]
    cache.check()


def test_resident_keys_and_their_versions_are_kept_per_layer():
    cache = make(3)
    v0, v1 = cache.layer_version[0], cache.layer_version[1]
    slot, _ = cache.access((0, 4))
    assert cache.resident == {0: {4: slot}, 1: {}} and cache.layer_version == {0: v0 + 1, 1: v1}
    cache.prefetch((1, 2))
    assert cache.unused == {0: set(), 1: {2}} and cache.layer_version[1] == v1 + 1
    cache.drop((1, 2))
    assert cache.resident[1] == {} and cache.layer_version[1] == v1 + 2 and cache.unused[1] == set()


def test_a_hit_on_a_prefetch_counts_it_used_once_and_pins_the_slot():
    cache = make(3)
    slot, _ = cache.prefetch((0, 1))
    assert cache.prefetch((0, 1)) == (slot, False)  # already reserved: nothing counted again
    c = cache.counters[0]
    assert (c.prefetch_issued, c.bytes_loaded, c.hits, c.misses) == (1, 100, 0, 0)
    assert cache.access((0, 1)) == (slot, False) and cache.access((0, 1)) == (slot, False)
    assert (c.hits, c.prefetch_used, cache.pins[slot]) == (2, 1, 2)
    assert (0, 1) not in cache.unused_prefetch and cache.unused[0] == set()
    cache.unpin(slot)
    cache.unpin(slot)
    with pytest.raises(AssertionError, match="unpinned more often than pinned"):
        cache.unpin(slot)


def test_only_a_loading_slot_becomes_ready_and_only_a_ready_unpinned_slot_is_evictable():
    cache = make(2)
    cache.mark_ready(1)
    assert cache.state[1].name == "EMPTY"
    slot, _ = cache.access((0, 1))
    assert not cache.evictable(slot)  # pinned and loading
    cache.mark_ready(slot)
    assert not cache.evictable(slot)  # pinned
    cache.unpin(slot)
    assert cache.evictable(slot)


def test_demoting_a_used_key_counts_nothing_wasted():
    cache = make(2)
    load(cache, (0, 1))
    cache.demote((0, 1))
    cache.demote((0, 7))  # not resident: nothing to do
    assert cache.counters[0].prefetch_wasted == 0
    slot, _ = cache.prefetch((0, 2))
    cache.mark_ready(slot)
    load(cache, (0, 2))
    cache.demote((0, 2))  # used before it turned out wrong for a later token: a plain demotion
    assert cache.counters[0].prefetch_wasted == 0 and list(cache.policy.victims())[0] == (0, 2)


def test_evicting_an_unused_prefetch_counts_it_wasted():
    cache = make(1)
    slot, _ = cache.prefetch((0, 1))
    cache.mark_ready(slot)
    load(cache, (1, 2))
    c0, c1 = cache.counters[0], cache.counters[1]
    assert (c0.evictions, c0.prefetch_wasted, c1.evictions) == (1, 1, 0)
    assert cache.unused_prefetch == set() and cache.unused[0] == set()


def test_a_drop_of_a_used_prefetch_is_not_wasted():
    cache = make(2)
    slot, _ = cache.prefetch((0, 1))
    cache.access((0, 1))
    cache.unpin(slot)
    cache.drop((0, 1))
    c = cache.counters[0]
    assert (c.prefetch_dropped, c.prefetch_wasted, c.bytes_loaded) == (1, 0, 0)


def test_a_prefetch_walks_at_most_its_limit_of_candidates():
    n = PREFETCH_VICTIM_WALK + 1
    cache = ExpertCache(n, expert_bytes=1, layer_ids=[0, 1])
    for e in range(n):
        load(cache, (0, e))
    first = {(0, e) for e in range(PREFETCH_VICTIM_WALK)}
    assert cache.prefetch((1, 0), protected=first) is None  # the one evictable key is the 65th
    almost = {(0, e) for e in range(PREFETCH_VICTIM_WALK - 1)}
    slot, needs = cache.prefetch((1, 0), protected=lambda key: key in almost)
    assert needs and slot == n - 2 and cache.lookup((0, PREFETCH_VICTIM_WALK - 1)) is None
    # a demand access looks as far as it must: past 64 pinned keys to the 65th
    cache = ExpertCache(n, expert_bytes=1, layer_ids=[0, 1])
    for e in range(n):
        load(cache, (0, e))
    for e in range(PREFETCH_VICTIM_WALK):
        cache.access((0, e))  # pinned
        cache.demote((0, e))  # and first in the eviction order
    assert cache.access((1, 0)) == (n - 1, True)


def test_no_slot_at_all_is_refused_and_an_empty_policy_is_kept():
    with pytest.raises(CacheCapacityError, match="at least 1 slot, got 0; raise cache_slots"):
        ExpertCache(0, expert_bytes=1, layer_ids=[0])
    policy = LFUPolicy()  # empty, so falsy: still the one used
    assert ExpertCache(1, expert_bytes=1, layer_ids=[0], policy=policy).policy is policy
    assert isinstance(make().policy, LRUPolicy)


def test_totals_add_every_counter_and_reset_starts_them_again():
    cache = make(2)
    cache.counters[0] = Counters(*range(1, 13))
    cache.counters[1] = Counters(*range(10, 130, 10))
    total = cache.totals()
    assert list(asdict(total).values()) == [a + b for a, b in zip(range(1, 13), range(10, 130, 10))]
    cache.reset_counters()
    assert cache.counters == {0: Counters(), 1: Counters()} and cache.totals() == Counters()


def test_the_capacity_error_names_the_key_and_the_pool():
    cache = make(1)
    cache.access((0, 1))
    message = "no free slot for layer 1 expert 3: all 1 slots are in use or in flight; raise cache_slots$"
    with pytest.raises(CacheCapacityError, match=message):
        cache.access((1, 3))


def test_counters_add_up_over_several_events():
    cache = make(2)
    for e in (1, 2):
        slot, _ = cache.prefetch((0, e))
        cache.mark_ready(slot)
        load(cache, (0, e))
    assert cache.counters[0].prefetch_used == 2
    for e in (3, 4):  # two unused prefetches evicted
        slot, _ = cache.prefetch((1, e))
        cache.mark_ready(slot)
    for e in (5, 6):
        load(cache, (0, e))
    assert (cache.counters[1].evictions, cache.counters[1].prefetch_wasted) == (2, 2)
    for e in (7, 8):  # two dropped before their copies started
        cache.prefetch((1, e))
    cache.drop((1, 7))
    cache.drop((1, 8))
    assert (cache.counters[1].prefetch_dropped, cache.counters[1].prefetch_wasted) == (2, 4)


def test_a_slot_given_back_is_empty():
    cache = make(1)
    slot, _ = cache.prefetch((0, 1))
    cache.drop((0, 1))
    assert cache.state[slot] is SlotState.EMPTY and cache.key_of[slot] is None


@pytest.mark.parametrize("corrupt", ["key_of", "state", "pinned free slot", "free key"])
def test_check_finds_a_broken_table(corrupt):
    cache = make(3)
    slot = load(cache, (0, 1))[0]
    free = cache._free[0]
    if corrupt == "key_of":
        cache.key_of[slot] = (0, 2)
    elif corrupt == "state":
        cache.state[slot] = SlotState.EMPTY
    elif corrupt == "pinned free slot":
        cache.pins[free] = 1
    else:
        cache.key_of[free] = (1, 1)
    with pytest.raises(AssertionError):
        cache.check()


def test_stalls_add_up_per_layer():
    cache = make(1)
    cache.add_stall(1, 0.25)
    cache.add_stall(1, 0.5)
    assert (cache.counters[1].stall_seconds, cache.counters[0].stall_seconds) == (0.75, 0.0)
