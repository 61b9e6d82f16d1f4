"""Eviction policies (LRU, LFU, LFRU) on their own and inside ExpertCache: order, demotion,
prefetches that are not uses, the cost of the lazy victim walk, and the cache's invariants."""

from __future__ import annotations

import sys
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moe_prefetch.cli.main import app
from moe_prefetch.errors import ConfigError
from moe_prefetch.runtime.cache import ExpertCache, LFRUPolicy, LFUPolicy, LRUPolicy, SlotState, make_policy
from moe_prefetch.runtime.config import CACHE_POLICIES, RuntimeConfig

KEYS = [(0, e) for e in range(10)]


def use(policy, key, times=1):
    """What the cache does on a demand miss: insert, then count the use."""
    if key not in policy:
        policy.insert(key)
    for _ in range(times):
        policy.touch(key)


def make_cache(slots, name):
    return ExpertCache(slots, expert_bytes=100, layer_ids=[0, 1], policy=make_policy(name))


def load(cache, key):
    slot, needs = cache.access(key)
    cache.mark_ready(slot)
    cache.unpin(slot)
    return needs


# -- order on hand-made sequences ------------------------------------------------------------
def test_lru_order_unchanged():
    policy = make_policy("lru")
    assert isinstance(policy, LRUPolicy)
    for key in KEYS[:4]:
        use(policy, key)
    policy.touch(KEYS[0])
    policy.insert(KEYS[4])  # a prefetch lands at the recent end, as before
    assert list(policy.victims()) == [KEYS[1], KEYS[2], KEYS[3], KEYS[0], KEYS[4]]


@pytest.mark.parametrize("name, kept", [("lru", False), ("lfu", True)])
def test_lfu_keeps_the_hot_key_through_a_scan(name, kept):
    cache = make_cache(3, name)
    hot = (0, 0)
    for _ in range(4):
        load(cache, hot)
    for expert_id in range(1, 5):  # a scan: four experts used once each
        load(cache, (1, expert_id))
    assert (cache.lookup(hot) is not None) is kept
    cache.check()


def test_lfu_ages_old_popularity_away():
    """LFU-DA: each eviction raises the floor that new uses start from, so a key that was hot
    long ago outlives the first keys of a scan, then goes (plain LFU would keep it forever)."""
    cache = make_cache(3, "lfu")
    hot = (0, 0)
    for _ in range(3):
        load(cache, hot)
    gone_at = None
    for expert_id in range(1, 20):
        load(cache, (1, expert_id))
        if cache.lookup(hot) is None:
            gone_at = expert_id
            break
    assert gone_at is not None and gone_at >= 5  # the 3rd key is the first eviction; hot survived two


def test_lfu_ties_go_least_recent_first():
    policy = LFUPolicy()
    for key in KEYS[:3]:
        use(policy, key, times=2)
    use(policy, KEYS[3], times=1)
    policy.touch(KEYS[0])
    assert list(policy.victims()) == [KEYS[3], KEYS[1], KEYS[2], KEYS[0]]


def test_lfru_protects_a_recent_key_and_a_frequent_key():
    """The recency segment (half the keys here) protects the latest keys whatever their count;
    beyond it the frequent key outlives keys used once. LRU and LFU each lose one of the two."""
    frequent, recent = KEYS[0], KEYS[4]
    orders = {}
    for name in CACHE_POLICIES:
        policy = make_policy(name)
        use(policy, frequent, times=5)
        for key in KEYS[1:5]:  # recent is the last of these
            use(policy, key)
        orders[name] = list(policy.victims())
    assert orders["lfru"] == [KEYS[1], KEYS[2], frequent, KEYS[3], recent]
    assert orders["lru"][0] == frequent  # LRU evicts the frequent key first
    assert orders["lfu"].index(recent) < orders["lfu"].index(frequent)  # LFU ranks recent below frequent
    assert orders["lfu"].index(recent) < 4


def test_lfru_frequent_key_survives_in_a_cache():
    cache = ExpertCache(4, expert_bytes=100, layer_ids=[0, 1], policy=LFRUPolicy(window=0.5))
    frequent = (0, 0)
    for _ in range(5):
        load(cache, frequent)
    for expert_id in range(1, 8):  # a scan longer than the cache
        load(cache, (1, expert_id))
        assert cache.lookup(frequent) is not None
        assert cache.lookup((1, expert_id)) is not None  # the newest key is never the victim
    cache.check()


# -- demote and prefetch -------------------------------------------------------------------------
@pytest.mark.parametrize("name", CACHE_POLICIES)
def test_demote_puts_a_key_first(name):
    policy = make_policy(name)
    for i, key in enumerate(KEYS[:6]):
        use(policy, key, times=i + 1)
    policy.demote(KEYS[5])  # the most used and most recent key
    policy.demote(KEYS[3])
    assert list(policy.victims())[:2] == [KEYS[3], KEYS[5]]  # most recently demoted first
    assert sorted(policy.victims()) == KEYS[:6]
    policy.touch(KEYS[3])  # a later use is a plain hit: it leaves the front
    assert next(policy.victims()) == KEYS[5]


@pytest.mark.parametrize("name", CACHE_POLICIES)
def test_demoted_prefetch_goes_first_in_the_cache(name):
    cache = make_cache(3, name)
    load(cache, (0, 1))
    load(cache, (0, 2))
    slot, _ = cache.prefetch((1, 3))
    cache.mark_ready(slot)
    cache.demote((1, 3))  # wrong prediction
    load(cache, (0, 4))
    assert cache.lookup((1, 3)) is None and cache.lookup((0, 1)) is not None
    cache.check()


@pytest.mark.parametrize("name", ["lfu", "lfru"])
def test_a_prefetch_is_not_a_use(name):
    cache = make_cache(4, name)
    load(cache, (0, 1))  # a demand miss: one use
    slot, _ = cache.prefetch((0, 2))  # predicted, not yet used
    cache.mark_ready(slot)
    assert cache.policy.counts == {(0, 1): 1, (0, 2): 0}
    load(cache, (0, 2))  # its first use is a hit that counts one, as a demand miss does
    load(cache, (0, 1))
    assert cache.policy.counts == {(0, 1): 2, (0, 2): 1}


def test_lfu_evicts_an_unused_prefetch_before_a_used_key():
    cache = make_cache(2, "lfu")
    load(cache, (0, 1))
    slot, _ = cache.prefetch((0, 2))  # more recent, but never used
    cache.mark_ready(slot)
    load(cache, (0, 3))
    assert cache.lookup((0, 2)) is None and cache.lookup((0, 1)) is not None


# -- cost: proportional to the keys walked, never to the pool ------------------------------------
def _filled(name, size):
    """A policy holding `size` keys with many distinct counts, some demoted."""
    policy = make_policy(name)
    for i in range(size):
        key = (i % 48, i // 48)
        use(policy, key, times=i % 7)
        if i % 11 == 0:
            policy.demote(key)
    return policy


def _cost(fn) -> tuple[int, int]:
    """(Python line events, peak bytes allocated) while `fn` runs: both grow with any work or
    copy in proportion to the pool, in Python or in C, so equal costs at 30 and 3,000 keys
    mean the work is independent of the pool. Counted, not timed."""
    events = 0

    def tracer(frame, event, arg):
        nonlocal events
        events += 1
        return tracer

    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    return events, peak


@pytest.mark.parametrize("name", CACHE_POLICIES)
@pytest.mark.parametrize("walked", [1, 8])
def test_the_victim_walk_costs_the_keys_walked_not_the_pool(name, walked):
    small, large = _filled(name, 30), _filled(name, 3000)

    def walk(policy):
        victims = policy.victims()
        return lambda: [next(victims) for _ in range(walked)]

    (small_events, small_peak), (large_events, large_peak) = _cost(walk(small)), _cost(walk(large))
    assert large_events <= small_events + 4 * walked, (small_events, large_events)
    assert large_peak <= small_peak + 1024, (small_peak, large_peak)  # no copy of the pool (3,000 keys: 24 kB+)


@pytest.mark.parametrize("name", CACHE_POLICIES)
def test_updates_cost_the_same_at_any_pool_size(name):
    def ops(policy):
        def run():
            policy.touch((0, 0))
            policy.touch((1, 0))
            policy.insert((99, 0))
            policy.demote((2, 0))
            policy.touch((2, 0))
            policy.remove((99, 0))
            policy.remove((3, 0))

        return run

    small, large = _cost(ops(_filled(name, 30))), _cost(ops(_filled(name, 3000)))
    assert large[0] <= small[0] + 8, (small, large)
    assert large[1] <= small[1] + 1024, (small, large)


# -- the cache's invariants with every policy -------------------------------------------------------
ops = st.lists(
    st.tuples(st.sampled_from(["access", "prefetch", "ready", "demote", "drop"]), st.integers(0, 1), st.integers(0, 5)),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(CACHE_POLICIES), slots=st.integers(1, 5), program=ops)
def test_cache_invariants_hold_with_every_policy(name, slots, program):
    cache = make_cache(slots, name)
    for op, layer, expert in program:
        key = (layer, expert)
        if op == "access":
            for s, state in enumerate(cache.state):
                if state is SlotState.LOADING:
                    cache.mark_ready(s)
            load(cache, key)
        elif op == "prefetch":
            cache.prefetch(key)
        elif op == "ready":
            for s in range(slots):
                cache.mark_ready(s)
        elif op == "demote" and key in cache.slot_of:
            cache.demote(key)
            assert next(cache.policy.victims()) == key
        elif op == "drop" and key in cache.unused_prefetch and cache.state[cache.slot_of[key]] is SlotState.LOADING:
            cache.drop(key)
        cache.check()
        walked = list(cache.policy.victims())
        assert len(walked) == len(set(walked)) == len(cache.policy) == len(cache.slot_of)


# -- configuration -----------------------------------------------------------------------------------
def test_unknown_policy_names_the_choices():
    with pytest.raises(ConfigError, match="choose one of lru, lfu, lfru"):
        make_policy("mru")
    with pytest.raises(ConfigError, match="choose one of lru, lfu, lfru"):
        RuntimeConfig(cache_policy="mru")
    assert RuntimeConfig().cache_policy == "lru"


def test_run_rejects_an_unknown_policy_in_one_line():
    result = CliRunner().invoke(app, ["run", "--prompt", "x", "--device", "cpu", "--cache-policy", "mru"])
    assert result.exit_code != 0
    assert "unknown cache_policy 'mru'; choose one of lru, lfu, lfru" in result.output


# -- the aging clock moves only on evictions, and LFRU's segments one rule at a time ---------------------
def test_lfu_demoting_a_key_does_not_age_the_others():
    """Only an eviction raises the LFU-DA floor: after demoting a hot key, a new key still starts
    below a key used once (had the demotion aged the clock, it would start above it)."""
    policy = LFUPolicy()
    hot, once, new = KEYS[:3]
    use(policy, hot, times=5)
    use(policy, once)
    policy.demote(hot)
    policy.insert(new)
    assert list(policy.victims()) == [hot, new, once]


def test_lfru_a_use_or_a_demotion_in_the_frequency_segment_does_not_age_it():
    policy = LFRUPolicy(window=0.5)
    for i, key in enumerate(KEYS[:4]):
        use(policy, key, times=4 - i)  # KEYS[0] used most; KEYS[2:4] stay recent
    assert list(policy.victims()) == [KEYS[1], KEYS[0], KEYS[2], KEYS[3]]
    policy.touch(KEYS[1])  # from the frequency segment back to the recent one
    policy.demote(KEYS[2])  # the touch pushed it into the frequency segment
    assert policy._ranked.age == 0
    policy.remove(KEYS[2])  # a demoted key leaves without aging either
    assert policy._ranked.age == 0


def test_lfru_evicting_from_the_frequency_segment_ages_it():
    policy = LFRUPolicy(window=0.5)
    for i, key in enumerate(KEYS[:4]):
        use(policy, key, times=4 - i)
    evicted = next(policy.victims())
    assert evicted == KEYS[1] and policy.counts[evicted] == 3
    policy.remove(evicted)
    assert policy._ranked.age == 3  # the evicted key's priority: later keys start from it


def test_lfru_demoting_a_key_of_the_frequency_segment_moves_it_once():
    policy = LFRUPolicy(window=0.5)
    for i, key in enumerate(KEYS[:4]):
        use(policy, key, times=4 - i)
    policy.demote(KEYS[0])  # in the frequency segment
    walked = list(policy.victims())
    assert walked[0] == KEYS[0] and len(walked) == len(set(walked)) == 4


def test_lfru_keeps_one_recent_key_at_least_and_a_window_share_beyond():
    policy = LFRUPolicy(window=0.5)
    a, b, c = KEYS[:3]
    use(policy, a, times=3)
    use(policy, b)
    policy.insert(c)  # 3 keys, half of them recent: one
    assert list(policy.victims()) == [b, a, c]


@pytest.mark.parametrize("window", [0.0, -0.1, 1.5])
def test_lfru_window_outside_zero_to_one_is_refused(window):
    with pytest.raises(ValueError, match=r"window=.* must be in \(0, 1\]"):
        LFRUPolicy(window=window)


def test_lfru_window_of_one_keeps_every_key_recent():
    policy = LFRUPolicy(window=1.0)
    for i, key in enumerate(KEYS[:3]):
        use(policy, key, times=3 - i)
    assert list(policy.victims()) == KEYS[:3]  # least recent first, whatever the counts
