"""Uploads as investments: with misses on the host, the scheduler uploads an expert when its
expected uses save more host time than its link time, within a link budget, evicting only
experts worth less; and a placement that counts what is left of a copy in flight."""

from __future__ import annotations

import pytest

from moe_prefetch.runtime.cache import ExpertCache
from moe_prefetch.runtime.loader import Loader
from moe_prefetch.runtime.placement import DEFAULT_COSTS, LaneCosts, Placement
from moe_prefetch.runtime.scheduler import MIN_GAIN, UPLOAD_WINDOW_LAYERS, Scheduler, _saving
from moe_prefetch.runtime.uploads import UploadValue

EXPERT_BYTES = 10_000_000
# A 1 GB/s link and a 1 GB/s host lane: a 10 MB expert takes 10 ms either way, on a device 1000x faster.
COSTS = LaneCosts(1e9, 1e9, 1e12, 0.0, 1e12, 1e14)


class Link(Loader):
    """Records what would be copied; nothing ever lands."""

    def __init__(self, num_slots):
        super().__init__(num_slots)
        self.copies = []

    def submit(self, slot, src, dst, priority, tag=None):
        self.copies.append((tag, priority))

    def done(self, slot):
        return False

    def cancel(self, slot):
        return False


def scheduler_with(num_slots: int, layer_s: float = 0.05, layers=(0, 1, 2, 3)) -> tuple[Scheduler, Link]:
    cache = ExpertCache(num_slots, EXPERT_BYTES, list(layers))
    link = Link(num_slots)
    scheduler = Scheduler(cache, link, lambda key, slot: (None, None), list(layers), top_k=1)
    scheduler.placement = Placement(COSTS, EXPERT_BYTES, EXPERT_BYTES // 2, "auto")
    scheduler.layer_s = layer_s  # as if measured: the upload budget and in-time checks read it
    return scheduler, link


def resident(scheduler: Scheduler, *keys) -> None:
    """Make `keys` resident and ready (a demand load that has landed), without touching the value model."""
    for key in keys:
        slot, _ = scheduler.cache.access(key)
        scheduler.cache.mark_ready(slot)
        scheduler.cache.unpin(slot)


def use(scheduler: Scheduler, steps: dict[int, list[tuple[int, int]]], until: int) -> None:
    """Tokens 0..until: at token t, each key in steps[t] serves its layer."""
    for step in range(until + 1):
        scheduler.new_step()
        for layer_idx, expert_id in steps.get(step, []):
            scheduler.value.used(layer_idx, [expert_id])


def uploaded(link: Link) -> list:
    return [tag for tag, _ in link.copies]


def test_a_predicted_hot_expert_is_uploaded_and_a_cold_host_served_one_is_not():
    scheduler, link = scheduler_with(num_slots=4)
    hot, cold = (2, 3), (1, 4)
    use(scheduler, {**{t: [hot] for t in range(20, 30)}, 0: [cold]}, until=30)
    scheduler.upload(1, [cold[1]])  # served on the host, last used 30 tokens ago: not worth a copy
    assert uploaded(link) == []
    scheduler.prefetch(0, [(2, 2, [hot[1]])])  # hot, and predicted two layers ahead (50 ms: in time)
    assert uploaded(link) == [hot]
    assert link.copies[0][1] == 2.0, "an in-time prediction is queued by its distance, ahead of background uploads"


def test_a_late_prediction_pays_only_through_later_tokens():
    """A prediction that cannot land before its layer adds nothing; a hot expert is still worth
    uploading then (for the tokens after), behind the copies aimed at this token."""
    scheduler, link = scheduler_with(num_slots=4, layer_s=0.001)  # a layer is 1 ms, a copy 10 ms
    use(scheduler, {t: [(1, 6)] for t in range(10)}, until=10)
    scheduler.prefetch(0, [(1, 1, [5, 6])])  # 5 never used: only the prediction could pay for it
    assert link.copies == [((1, 6), float(len(scheduler.moe_layer_ids) + 1))]
    scheduler, link = scheduler_with(num_slots=4, layer_s=0.05)  # in time: the prediction alone pays
    scheduler.new_step()
    scheduler.prefetch(0, [(1, 1, [5])])
    assert uploaded(link) == [(1, 5)]


def test_uploads_stay_within_the_link_budget():
    layer_s = 0.015  # a copy takes 10 ms: two layers' worth of link time holds 3 copies
    scheduler, link = scheduler_with(num_slots=16, layer_s=layer_s)
    hot = [(1, e) for e in range(6)]
    use(scheduler, {t: hot for t in range(10)}, until=10)
    scheduler.upload(1, [e for _, e in hot])
    budget = int(UPLOAD_WINDOW_LAYERS * layer_s / scheduler.placement.link_s())
    assert budget == 3 and len(link.copies) == budget
    scheduler.upload(1, [e for _, e in hot])  # still in flight: no room for more
    assert len(link.copies) == budget


def test_a_victim_worth_more_than_the_upload_is_kept():
    scheduler, link = scheduler_with(num_slots=2)
    hot, cold = (0, 0), (0, 1)
    resident(scheduler, hot, cold)  # least recently used first: hot, then cold
    candidate, rival = (1, 5), (1, 6)
    use(scheduler, {**{t: [hot] for t in range(10)}, 10: [cold], 20: [candidate, rival], 21: [candidate, rival]}, 22)
    uses = {k: scheduler.value.uses(k) for k in (hot, cold, candidate)}
    assert uses[hot] > uses[candidate] > uses[cold]
    scheduler.upload(1, [5, 6])
    assert uploaded(link) == [candidate], "one victim is worth less than the upload: the cold expert"
    slot_of = scheduler.cache.slot_of
    assert hot in slot_of and cold not in slot_of and rival not in slot_of


@pytest.mark.parametrize("left, on_host", [(1.0, True), (0.05, False)])
def test_placement_waits_for_a_copy_that_has_nearly_landed(left, on_host):
    mixtral = 3 * 4096 * 14336
    placement = Placement(DEFAULT_COSTS, 2 * mixtral, mixtral, "auto")
    assert placement.on_host(1, in_flight=True, left=left) is on_host


# -- the prices one by one: the saving per use, which rules a placement implies, the queue, landing
# in time, the window before a layer time is known, and the least gain worth a copy --------------
def test_a_use_on_the_device_saves_the_host_time_less_the_device_time():
    placement = Placement(COSTS, EXPERT_BYTES, EXPERT_BYTES // 2, "auto")
    assert _saving(placement) == pytest.approx(placement.host_s(1) - placement.device_s(1))
    assert _saving(placement) == pytest.approx(0.01 - 1e-5)
    flop_bound = Placement(LaneCosts(1e9, 1e12, 1e9, 0.0, 1e12, 1e10), 1000, 10**6)  # one token's FLOPs
    assert _saving(flop_bound) == pytest.approx(2e-3 - 2e-4)


@pytest.mark.parametrize("decay, horizon", [(1.0, 4.0), (-0.1, 4.0), (0.5, 0.0), (0.5, -1.0)])
def test_upload_value_refuses_a_decay_outside_zero_to_one_or_a_horizon_not_positive(decay, horizon):
    with pytest.raises(ValueError, match=r"decay=.* must be in \[0, 1\)|horizon=.* must be positive \(tokens\)"):
        UploadValue(decay=decay, horizon=horizon)


def test_use_counts_decay_once_per_token_and_may_not_decay_at_all():
    value = UploadValue(decay=0.5, horizon=0.5)
    value.used(1, [5])
    value.new_step()
    assert value.count((1, 5)) == 0.5
    assert UploadValue(decay=0.0).decay == 0.0


# A host lane faster than the device at everything: a use on the device saves nothing.
FAST_HOST = LaneCosts(1e9, 1e13, 1e16, 0.0, 1e9, 1e9)


@pytest.mark.parametrize(
    "costs, on_miss, investing, no_copies",
    [
        (COSTS, "auto", True, False),
        (COSTS, "host", True, False),
        (COSTS, "wait", False, False),
        (FAST_HOST, "auto", False, False),
        (FAST_HOST, "host", False, True),
        (FAST_HOST, "wait", False, False),
        (None, None, False, False),
    ],
)
def test_the_placement_decides_once_whether_uploads_are_investments(costs, on_miss, investing, no_copies):
    scheduler, _ = scheduler_with(num_slots=2)
    scheduler.placement = None if costs is None else Placement(costs, EXPERT_BYTES, EXPERT_BYTES // 2, on_miss)
    assert (scheduler._investing(), scheduler._copies_cannot_pay()) == (investing, no_copies)


def test_the_queue_counts_every_copy_and_the_urgent_ones_apart():
    scheduler, link = scheduler_with(num_slots=8)
    link.left = lambda slot: 0.5
    use(scheduler, {0: [(1, 6), (1, 6), (2, 7), (2, 7)]}, until=0)
    scheduler.prefetch(0, [(1, 1, [5])])  # in time: urgent
    scheduler.upload(2, [7])  # served on the host: behind this token's copies
    assert uploaded(link) == [(1, 5), (2, 7)]
    total, urgent = scheduler._queue_s()
    assert (total, urgent) == (pytest.approx(2 * 0.5 * 0.01), pytest.approx(0.5 * 0.01))


def test_an_upload_lands_in_time_when_the_copies_ahead_and_its_own_fit_the_layers_to_go():
    scheduler, _ = scheduler_with(num_slots=2, layer_s=0.01)  # a copy is 10 ms, a layer 10 ms
    assert scheduler._lands(1, 0.0) and not scheduler._lands(1, 1e-6)
    assert scheduler._lands(2, 0.01) and not scheduler._lands(2, 0.0101)
    scheduler.layer_s = None
    assert not scheduler._lands(8, 0.0), "no layer time yet: nothing is known to land"


def test_before_a_layer_time_is_known_the_window_is_the_upload_budget():
    scheduler, link = scheduler_with(num_slots=16, layer_s=None)
    hot = [(1, e) for e in range(6)]
    use(scheduler, {t: hot for t in range(10)}, until=10)
    scheduler.upload(1, [e for _, e in hot])
    assert scheduler.upload_budget == 2 and len(link.copies) == 2
    assert [p for _, p in link.copies] == [float(len(scheduler.moe_layer_ids) + 1)] * 2


def test_an_upload_must_gain_a_quarter_use_even_on_an_idle_link():
    scheduler, link = scheduler_with(num_slots=4)
    use(scheduler, {0: [(1, 5), (1, 6), (1, 6)]}, until=0)  # 0.2 and 0.4 expected uses
    uses = scheduler.value.uses((1, 5)), scheduler.value.uses((1, 6))
    assert uses == (pytest.approx(0.2), pytest.approx(0.4)) and uses[0] < MIN_GAIN < uses[1]
    scheduler.upload(1, [5, 6])
    assert uploaded(link) == [(1, 6)]


def test_expected_uses_add_a_predictions_chance_to_the_use_rate():
    value = UploadValue()
    value.used(1, [5])
    value.used(1, [5])  # two uses this token: 2 x (1 - 0.95) x 4 tokens
    value.predict(1, [5])
    assert value.uses((1, 5)) == pytest.approx(0.4 + 0.5)  # in time by default: the prior precision
    assert value.uses((1, 5), in_time=False) == pytest.approx(0.4)


def test_a_late_prediction_alone_is_not_uploaded():
    scheduler, link = scheduler_with(num_slots=4, layer_s=0.001)  # a copy cannot land in one layer
    scheduler.new_step()
    scheduler.prefetch(0, [(1, 1, [5])])
    assert uploaded(link) == []


def test_the_most_valuable_candidate_goes_first_when_the_link_has_room_for_one():
    scheduler, link = scheduler_with(num_slots=4, layer_s=0.005)  # window: one 10 ms copy
    use(scheduler, {0: [(1, 5)] * 2 + [(1, 6)] * 5}, until=0)  # 0.4 and 1.0 expected uses
    scheduler.upload(1, [5, 6])
    assert uploaded(link) == [(1, 6)]


def test_a_resident_candidate_is_skipped_not_the_end_of_the_list():
    scheduler, link = scheduler_with(num_slots=4)
    resident(scheduler, (1, 5))
    use(scheduler, {0: [(1, 5)] * 5 + [(1, 6)] * 5}, until=0)
    scheduler.upload(1, [5, 6])
    assert uploaded(link) == [(1, 6)]


def test_a_queue_near_its_window_charges_nearly_a_copys_worth_of_uses():
    """Link time is priced by how full the queue is: with 20 of 30 ms queued, an upload must bring
    2/3 of a full copy's worth of uses (link / saving per use, ~1 here) beyond MIN_GAIN."""
    scheduler, link = scheduler_with(num_slots=8, layer_s=0.015)
    use(scheduler, {0: [(1, 1)] * 12 + [(1, 2)] * 11 + [(1, 3)] * 3}, until=0)  # 2.4, 2.2, 0.6 uses
    scheduler.upload(1, [1, 2, 3])
    assert uploaded(link) == [(1, 1), (1, 2)]


def test_the_queue_counts_what_is_left_of_each_copy():
    scheduler, link = scheduler_with(num_slots=8)
    use(scheduler, {0: [(2, 7)] * 4}, until=0)
    scheduler.prefetch(0, [(1, 1, [5, 6])])  # two urgent copies
    scheduler.upload(2, [7])  # one behind them
    slots = {key: scheduler.cache.slot_of[key] for key in [(1, 5), (1, 6), (2, 7)]}
    share = {slots[(1, 5)]: 0.5, slots[(1, 6)]: 0.25, slots[(2, 7)]: 0.125}
    link.left = share.__getitem__
    total, urgent = scheduler._queue_s()
    assert (total, urgent) == (pytest.approx(0.875 * 0.01), pytest.approx(0.75 * 0.01))


def test_precision_is_the_share_of_predicted_experts_their_layer_routed():
    value = UploadValue()
    assert value.precision == 0.5  # the prior, before any prediction is scored
    value.predict(1, [5, 6])
    value.predict(2, [9])
    value.used(1, [5, 6])  # both right
    assert value.precision == pytest.approx((2 + 2) / (2 + 4))
    value.used(1, [5])  # no prediction for this pass of layer 1 any more: nothing scored
    assert value.precision == pytest.approx((2 + 2) / (2 + 4))
    value.used(2, [7, 8])  # wrong
    assert value.precision == pytest.approx((2 + 2) / (3 + 4))
