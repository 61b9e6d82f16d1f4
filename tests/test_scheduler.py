"""The scheduler's prefetch rules on their own, with a link that records copies and lands them
when told: a prefetch evicts only what its prediction rules out (never what the running or
next layers will use, nor what served its layer in the latest pass), and prefetches that the
running layer's routing proves stale are cancelled (queued) or demoted and counted wasted
(resident)."""

from __future__ import annotations

import pytest

from moe_prefetch.runtime.cache import ExpertCache
from moe_prefetch.runtime.loader import DEMAND, Loader
from moe_prefetch.runtime.scheduler import Scheduler

LAYERS = [0, 1, 2, 3]


class Link(Loader):
    """Records every copy; a copy lands when the test says so (`land`) or when a layer waits for it."""

    def __init__(self, num_slots):
        super().__init__(num_slots)
        self.copies: list[tuple[tuple[int, int], float]] = []  # (key, priority) in submission order
        self.cancelled: list[tuple[int, int]] = []
        self.queued: dict[int, tuple[int, int]] = {}  # slot -> key, copies not yet landed
        self.waits: list[tuple[tuple[int, int] | None, int]] = []  # (key waited for, layer that waited)
        self.released: list[int] = []

    def submit(self, slot, src, dst, priority, tag=None):
        assert (src, dst) == (("src", tag), ("dst", slot)), "the copy of `tag` into `slot` from `source`"
        self.copies.append((tag, priority))
        self.queued[slot] = tag

    def land(self, *keys) -> None:
        for slot, key in list(self.queued.items()):
            if key in keys:
                del self.queued[slot]

    def done(self, slot):
        return slot not in self.queued

    def wait(self, slot, layer_idx):
        self.waits.append((self.queued.pop(slot, None), layer_idx))

    def release(self, slot):
        self.released.append(slot)

    def cancel(self, slot):
        key = self.queued.pop(slot, None)
        if key is not None:
            self.cancelled.append(key)
        return key is not None


def scheduler_with(num_slots: int) -> tuple[Scheduler, Link]:
    cache = ExpertCache(num_slots, expert_bytes=100, layer_ids=LAYERS)
    link = Link(num_slots)
    return Scheduler(cache, link, lambda key, slot: (("src", key), ("dst", slot)), LAYERS, top_k=1), link


def serve(scheduler: Scheduler, layer_idx: int, experts: list[int]) -> None:
    """One MoE layer as the runtime drives it (no placement: every miss waits for its copy)."""
    host, waves = scheduler.plan(layer_idx, experts)
    assert host == []
    link = scheduler.loader
    for wave in waves:
        seen = len(link.waits)
        slots = scheduler.acquire(layer_idx, wave)
        assert not set(slots.values()) & set(link.queued), "a layer read a slot before its copy landed"
        assert all(layer == layer_idx for _, layer in link.waits[seen:]), "a stall is the waiting layer's"
        scheduler.release(slots.values())
        assert link.released[-len(slots) :] == list(slots.values())


def resident(scheduler: Scheduler) -> set[tuple[int, int]]:
    return set(scheduler.cache.slot_of)


def test_a_prefetch_evicts_what_its_prediction_rules_out_not_what_served_the_latest_pass():
    scheduler, link = scheduler_with(num_slots=5)
    scheduler.new_step()  # token 0
    serve(scheduler, 0, [8])
    serve(scheduler, 3, [0])
    scheduler.new_step()  # token 1
    serve(scheduler, 0, [0])
    scheduler.prefetch(0, [(2, 2, [7])])
    link.land((2, 7))
    serve(scheduler, 1, [3])
    # Least recently used first: (0, 8) served layer 0 last token but not this one, (3, 0) served
    # layer 3 last token (its latest pass), (0, 0) served layer 0 this token, then (2, 7), which
    # the newer prediction for layer 2 rules out.
    assert list(scheduler.cache.policy.victims()) == [(0, 8), (3, 0), (0, 0), (2, 7), (1, 3)]
    scheduler.prefetch(1, [(2, 1, [4])])
    assert resident(scheduler) == {(3, 0), (0, 0), (2, 7), (1, 3), (2, 4)}
    assert link.copies[-1] == ((2, 4), 1.0), "queued by its distance"
    scheduler.prefetch(1, [(2, 1, [4, 5])])
    assert resident(scheduler) == {(3, 0), (0, 0), (1, 3), (2, 4), (2, 5)}
    scheduler.cache.check()


def test_a_prefetch_keeps_the_layers_before_its_target_and_evicts_experts_idle_for_two_tokens():
    scheduler, link = scheduler_with(num_slots=3)
    scheduler.new_step()  # token 0
    serve(scheduler, 3, [5])
    scheduler.new_step()  # token 1: layer 3's expert 5 is now two passes old when token 2 predicts
    scheduler.new_step()  # token 2
    scheduler.prefetch(0, [(1, 1, [2])])  # never used yet: only its layer lying ahead protects it
    link.land((1, 2))
    serve(scheduler, 0, [4])
    assert list(scheduler.cache.policy.victims()) == [(3, 5), (1, 2), (0, 4)]
    scheduler.prefetch(0, [(2, 2, [6])])
    assert resident(scheduler) == {(1, 2), (0, 4), (2, 6)}, "(3, 5) served no pass since token 0"
    # Outstanding speculation is capped at num_slots - top_k = 2 slots: (1, 2) and (2, 6).
    scheduler.prefetch(0, [(2, 2, [6, 7])])
    assert resident(scheduler) == {(1, 2), (0, 4), (2, 6)} and link.copies[-1][0] == (2, 6)


def test_the_running_layer_is_kept_however_long_ago_its_experts_served():
    scheduler, link = scheduler_with(num_slots=2)
    scheduler.new_step()  # token 0
    serve(scheduler, 0, [9])
    serve(scheduler, 3, [1])
    scheduler.new_step()
    scheduler.new_step()  # token 2: layer 0 runs again, routed elsewhere than (0, 9) so far
    assert list(scheduler.cache.policy.victims()) == [(0, 9), (3, 1)]
    scheduler.prefetch(0, [(2, 2, [6])])
    assert resident(scheduler) == {(0, 9), (2, 6)}, "(3, 1) goes: two tokens idle, beyond the target"


def test_an_upload_after_the_host_lane_keeps_what_the_next_layer_is_expected_to_use():
    scheduler, link = scheduler_with(num_slots=3)
    scheduler.new_step()  # token 0: the predictions for layer 2 change their mind twice
    for expert_id in (1, 5, 1):
        scheduler.prefetch(0, [(2, 2, [expert_id])])
        link.land((2, expert_id))
    serve(scheduler, 1, [0])
    assert list(scheduler.cache.policy.victims()) == [(2, 1), (2, 5), (1, 0)]
    scheduler.upload(1, [3])  # layer 1 served expert 3 on the host
    assert resident(scheduler) == {(2, 1), (1, 0), (1, 3)}, "the upload keeps what layer 2 expects"
    assert link.copies[-1] == ((1, 3), float(len(LAYERS) + 1)), "uploads go behind every prediction"
    link.land((1, 3))
    scheduler.new_step()  # token 1, nothing predicted yet: (2, 1) is expected no more
    scheduler.upload(1, [7])
    assert resident(scheduler) == {(1, 0), (1, 3), (1, 7)}


def test_uploads_stay_within_their_budget_of_copies_in_flight():
    scheduler, link = scheduler_with(num_slots=8)
    assert scheduler.upload_budget == 2  # 2 x top_k
    scheduler.new_step()
    scheduler.upload(1, [0, 1, 2])
    assert [key for key, _ in link.copies] == [(1, 0), (1, 1)]
    scheduler.upload(1, [3])  # two copies in flight already
    assert len(link.copies) == 2
    link.land((1, 0))
    scheduler.reap()
    scheduler.upload(1, [3, 4])
    assert [key for key, _ in link.copies] == [(1, 0), (1, 1), (1, 3)]


def test_a_layer_with_a_placement_splits_host_and_device_and_counts_each_use():
    """With misses on the host (`on_miss="host"`), plan() sends the routed experts that are not
    resident and ready to the host lane; the rest run on the device, in waves of at most the pool."""
    from moe_prefetch.runtime.placement import DEFAULT_COSTS, Placement

    scheduler, link = scheduler_with(num_slots=2)
    host_only = Placement(DEFAULT_COSTS, 100, 50, on_miss="host")
    scheduler.placement = host_only  # uploads are investments: plan counts each use to price them
    scheduler.new_step()
    serve(scheduler, 1, [4, 5])
    host, waves = scheduler.plan(1, [3, 4, 6], {3: 1, 4: 1, 6: 1}, host_only)
    assert (host, waves) == ([3, 6], [[4]])
    assert scheduler.value.count((1, 4)) == pytest.approx(2.0) and scheduler.value.count((1, 6)) == pytest.approx(1.0)
    wait = Placement(DEFAULT_COSTS, 100, 50, on_miss="wait")
    assert scheduler.plan(1, [3, 4, 6], {3: 1, 4: 1, 6: 1}, wait) == ([], [[4, 3], [6]]), "resident first"
    assert scheduler.plan(1, [3, 6], {3: 1, 6: 1}, wait) == ([], [[3, 6]]), "one wave when the pool holds all"
    assert scheduler.plan(1, [3], {3: 1}, host_only) == ([3], []), "no device wave when all run on the host"


def test_speculation_stays_below_the_pool_less_top_k():
    scheduler, link = scheduler_with(num_slots=3)
    scheduler.new_step()
    scheduler.prefetch(0, [(1, 1, [1, 2, 3])])
    assert [key for key, _ in link.copies] == [(1, 1), (1, 2)], "3 slots - top_k 1: two outstanding"
    scheduler.prefetch(0, [(1, 1, [1, 2])])  # already there: no new copy, no new count
    assert len(link.copies) == 2


def test_stale_prefetches_are_cancelled_or_demoted_and_counted_wasted():
    scheduler, link = scheduler_with(num_slots=4)
    scheduler.new_step()
    serve(scheduler, 3, [0])
    scheduler.new_step()
    scheduler.prefetch(0, [(1, 1, [5, 6, 7])])
    link.land((1, 5), (1, 6))  # (1, 7) is still queued when layer 1 routes
    serve(scheduler, 1, [6])
    assert link.cancelled == [(1, 7)] and (1, 7) not in resident(scheduler)
    counters = scheduler.cache.counters[1]
    assert (counters.prefetch_issued, counters.prefetch_used) == (3, 1)
    assert (counters.prefetch_dropped, counters.prefetch_wasted) == (1, 2)
    assert counters.bytes_loaded == 200, "a cancelled copy moves no bytes"
    assert next(iter(scheduler.cache.policy.victims())) == (1, 5), "a wrong prediction goes first"
    serve(scheduler, 2, [0, 1])  # one free slot (the cancelled copy's), then one eviction
    assert resident(scheduler) == {(3, 0), (1, 6), (2, 0), (2, 1)}
    assert [p for _, p in link.copies[-2:]] == [DEMAND, DEMAND]
    scheduler.cache.check()


def test_a_landed_prefetch_alone_is_demoted_too():
    """Nothing of the layer in flight any more: its resident wrong predictions are still demoted."""
    scheduler, link = scheduler_with(num_slots=3)
    scheduler.new_step()
    serve(scheduler, 3, [0])
    scheduler.prefetch(0, [(1, 1, [5])])
    link.land((1, 5))
    serve(scheduler, 1, [6])
    assert scheduler.cache.counters[1].prefetch_wasted == 1
    assert next(iter(scheduler.cache.policy.victims())) == (1, 5)


# -- one rule at a time: the layer clock, the order of predictions, the speculation count, the
# upload's protection, and the per-expert placement inside plan() -----------------------------------
def test_the_layer_time_is_a_moving_average_of_the_gaps_within_a_token():
    scheduler, _ = scheduler_with(num_slots=2)
    scheduler.tick(1.0)
    assert scheduler.layer_s is None  # one tick: no gap yet
    scheduler.tick(1.5)
    assert scheduler.layer_s == pytest.approx(0.5)
    scheduler.tick(2.5)
    assert scheduler.layer_s == pytest.approx(0.8 * 0.5 + 0.2 * 1.0)
    scheduler.tick(2.5)  # no time passed: not a gap
    assert scheduler.layer_s == pytest.approx(0.6)
    scheduler.new_step()  # the gap across tokens (sampling, the head) is not a layer
    scheduler.tick(9.0)
    assert scheduler.layer_s == pytest.approx(0.6)
    scheduler.tick(9.1)
    assert scheduler.layer_s == pytest.approx(0.8 * 0.6 + 0.2 * 0.1)


def test_predictions_are_taken_nearest_first_whatever_their_order():
    scheduler, link = scheduler_with(num_slots=3)  # two slots of speculation
    scheduler.new_step()
    scheduler.prefetch(0, [(3, 2, [7, 8]), (2, 1, [9, 6])])
    assert link.copies == [((2, 9), 1.0), ((2, 6), 1.0)]


def test_the_running_layers_own_prefetches_are_not_speculation_any_more():
    scheduler, link = scheduler_with(num_slots=4)  # three slots of speculation
    scheduler.new_step()
    scheduler.prefetch(0, [(1, 1, [5])])
    link.land((1, 5))
    scheduler.prefetch(1, [(2, 1, [6, 7]), (3, 2, [8])])  # layer 1 runs: its (1, 5) is not counted
    assert [key for key, _ in link.copies] == [(1, 5), (2, 6), (2, 7), (3, 8)]


def test_a_target_with_nothing_to_evict_does_not_stop_the_next_target():
    scheduler, link = scheduler_with(num_slots=4)
    scheduler.new_step()  # token 0 fills the pool, one expert per layer
    for layer_idx, expert_id in zip(LAYERS, (0, 1, 2, 5)):
        serve(scheduler, layer_idx, [expert_id])
    scheduler.new_step()  # token 1, at layer 0
    # Layer 2 may evict none: (2, 2) is predicted again, the rest served their latest pass or lie
    # before the target. Layer 3 may evict its own (3, 5), which its prediction rules out.
    scheduler.prefetch(0, [(2, 1, [2, 6]), (3, 2, [7])])
    assert resident(scheduler) == {(0, 0), (1, 1), (2, 2), (3, 7)}


def test_an_upload_may_evict_the_running_layers_other_experts():
    scheduler, link = scheduler_with(num_slots=1)
    scheduler.new_step()
    serve(scheduler, 0, [1])
    scheduler.new_step()
    scheduler.upload(0, [4])  # layer 0 runs; (0, 1) is not among the experts it served on the host
    assert resident(scheduler) == {(0, 4)}


def test_an_upload_keeps_what_the_next_two_layers_expect_not_a_third():
    scheduler, link = scheduler_with(num_slots=2)
    scheduler.new_step()
    serve(scheduler, 1, [4])
    scheduler.prefetch(1, [(2, 1, [9])])
    link.land((2, 9))
    scheduler.new_step()
    scheduler.prefetch(0, [(2, 2, [9])])  # expected again, at layer 2: beyond layers 0 and 1
    scheduler.upload(0, [3])  # (1, 4) served its latest pass and stays; (2, 9) goes
    assert resident(scheduler) == {(1, 4), (0, 3)}


class Lanes:
    """A placement that records what plan() asks it: each expert's (tokens, in flight, host
    seconds placed before it, link seconds placed before it, share of its copy left)."""

    on_miss = "auto"

    def __init__(self, on_host):
        self.answers = list(on_host)
        self.asked = []

    def on_host(self, tokens, in_flight, host_busy, link_busy, left):
        self.asked.append((tokens, in_flight, host_busy, link_busy, left))
        return self.answers.pop(0)

    def host_s(self, tokens):
        return 10.0 * tokens

    def link_s(self):
        return 100.0


def test_each_miss_is_placed_behind_the_work_placed_before_it():
    scheduler, link = scheduler_with(num_slots=4)
    scheduler.new_step()
    serve(scheduler, 1, [4])  # resident and ready: not asked
    scheduler.prefetch(0, [(1, 1, [5, 9])])  # in flight, a quarter of 5's copy left
    left = {scheduler.cache.slot_of[(1, 5)]: 0.25, scheduler.cache.slot_of[(1, 9)]: 0.5}
    link.left = left.__getitem__
    lanes = Lanes([True, False, True, False, True])
    host, waves = scheduler.plan(1, [4, 6, 5, 9, 7, 8], {4: 9, 5: 2, 6: 3, 7: 1, 8: 4, 9: 1}, lanes)
    assert lanes.asked == [
        (3, False, 0.0, 0.0, 1.0),  # 6: first, nothing placed yet
        (2, True, 30.0, 0.0, 0.25),  # 5: behind 6 on the host (3 tokens x 10 s)
        (1, True, 30.0, 25.0, 0.5),  # 9: behind 5's quarter copy
        (1, False, 40.0, 25.0, 1.0),  # 7: behind 6 and 9 on the host
        (4, False, 40.0, 125.0, 1.0),  # 8: behind 7's whole copy
    ]
    assert host == [6, 9, 8] and waves == [[4, 5, 7]]


def test_a_demand_access_waits_for_copies_in_flight_when_every_slot_is_loading():
    scheduler, link = scheduler_with(num_slots=2)
    scheduler.new_step()
    scheduler.upload(1, [5, 6])  # both slots queued: neither can be evicted yet
    slots = scheduler.acquire(0, [3])
    waited = [((1, 5), 0), ((1, 6), 0), ((0, 3), 0)]
    assert link.waits == waited, "the copies in flight, then the demand load, each by layer 0"
    assert resident(scheduler) == {(0, 3), (1, 6)} and scheduler.loading[1] == {}
    assert link.copies[-1] == ((0, 3), DEMAND)
    scheduler.release(slots.values())


def test_a_full_pool_with_nothing_in_flight_is_an_error():
    from moe_prefetch.errors import CacheCapacityError

    scheduler, link = scheduler_with(num_slots=1)
    scheduler.new_step()
    scheduler.acquire(0, [3])  # pinned
    with pytest.raises(CacheCapacityError, match="raise cache_slots"):
        scheduler.acquire(1, [4])


def test_an_interrupted_wait_releases_the_wave():
    scheduler, link = scheduler_with(num_slots=2)
    scheduler.new_step()

    def interrupted(slot, layer_idx):
        raise KeyboardInterrupt

    link.wait = interrupted
    with pytest.raises(KeyboardInterrupt):
        scheduler.acquire(0, [3, 4])
    assert scheduler.cache.pins == [0, 0] and sorted(link.released) == [0, 1]
