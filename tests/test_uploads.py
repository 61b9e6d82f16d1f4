"""Uploads as investments: with misses on the host, the scheduler uploads an expert when its
expected uses save more host time than its link time, within a link budget, evicting only
experts worth less; and a placement that counts what is left of a copy in flight."""

from __future__ import annotations

import pytest

from moe_prefetch.runtime.cache import ExpertCache
from moe_prefetch.runtime.loader import Loader
from moe_prefetch.runtime.placement import DEFAULT_COSTS, LaneCosts, Placement
from moe_prefetch.runtime.scheduler import UPLOAD_WINDOW_LAYERS, Scheduler

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
