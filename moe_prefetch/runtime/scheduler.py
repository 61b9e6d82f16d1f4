"""Scheduling decisions, free of tensors: what to load, in which order, what to drop.

The runtime and the trace simulator both drive this one class, so a simulated run makes
exactly the decisions a measured one does. It talks to a cache (`ExpertCache`) and a
loader (real, or the simulator's virtual link) through their interfaces only; `source`
gives the (src, dst) a copy of `key` into `slot` needs (None, None in the simulator).

Rules:
- demand loads (the running layer's misses) go ahead of every prefetch;
- prefetches are ordered by distance, i.e. by when they will be needed;
- a prefetch evicts only the target layer's experts the prediction rules out, or experts
  that served nobody in the latest pass over their layer; never what the running or next
  layers are expected to use; outstanding speculation stays below num_slots - top_k;
- queued prefetches that turn out stale are dropped, and a resident prediction that
  turned out wrong is counted wasted and demoted to be the first evicted;
- a routed expert that is not resident runs where it finishes first (`placement.Placement`):
  on the host, or on the device after its upload (counting only the share of a copy in
  flight still to move);
- with misses on the host, uploads are investments (`_invest`, `uploads.UploadValue`): a
  predicted or host-served expert is uploaded when its expected uses save more host time than
  the link time it takes (priced by how full the upload queue is), evicting only experts worth
  less; at most UPLOAD_WINDOW_LAYERS layers' worth of link time is queued. With
  on_miss="wait" the prefetch rules above apply unchanged; where a use on the device saves no
  host time (a CPU device), host-served experts are uploaded behind every prediction, within a
  budget of copies in flight; with on_miss="host" there, nothing is copied at all (no copy
  could pay: `_copies_cannot_pay`).

Host cost per layer grows with the experts routed and predicted, never with the pool: what
a prefetch may not evict is a predicate evaluated only on the eviction candidates the cache
actually looks at, and in-flight copies and unused prefetches are indexed per layer.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from ..errors import CacheCapacityError
from .cache import ExpertCache, Key, SlotState
from .loader import DEMAND, Loader
from .placement import Placement
from .prediction import Prediction
from .uploads import UploadValue

# With misses on the host, the upload queue holds at most what the link moves in this many layers.
UPLOAD_WINDOW_LAYERS = 2.0
# Expected uses an upload must add over its victim even on an idle link, so that experts of
# about equal worth do not swap places (each swap costs a copy).
MIN_GAIN = 0.25


class Scheduler:
    def __init__(
        self, cache: ExpertCache, loader: Loader, source: Callable[[Key, int], tuple], moe_layer_ids, top_k: int = 1
    ):
        self.cache = cache
        # Outstanding speculation (prefetched for layers still to run) may hold at most
        # num_slots - top_k slots, so the running layer's demand loads always find room
        # without evicting what was just prefetched.
        self.max_speculative = cache.num_slots - top_k
        self.loader = loader
        self.source = source
        self.moe_layer_ids = sorted(moe_layer_ids)
        self.loading: dict[int, dict[int, int]] = {l: {} for l in self.moe_layer_ids}  # queued or in flight
        self.expected: dict[int, set[int]] = {}  # latest prediction per target layer
        self.step = -1
        self.last_used: dict[Key, int] = {}  # step in which each key last served its layer
        self.top_k = top_k
        # Before a layer time is known, at most this many uploads' link time queued.
        self.upload_budget = 2 * top_k
        self._background: set[int] = set()  # slots whose copy was queued behind this token's
        # With misses on the host, uploads are investments: what each expert is worth on the
        # device (use frequency and predictions), against its link time (`_invest`).
        self.value = UploadValue()
        # With misses served on the host, a prediction adds value only if its upload lands before
        # its layer runs (a late one is computed on the host anyway). The runtime or simulator sets
        # `placement` and calls `tick` at each MoE layer, so the scheduler knows how long a layer
        # takes: whether an upload lands in time (`_lands`) and how much link time to queue.
        self._placement: Placement | None = None
        self._invests = self._no_copies = False  # what the placement implies (`placement`)
        self.layer_s: float | None = None  # moving average of the time between MoE layers
        self._last_tick: float | None = None

    @property
    def placement(self) -> Placement | None:
        return self._placement

    @placement.setter
    def placement(self, placement: Placement | None) -> None:
        # Decided once per placement, not per layer call: both compare lane speeds that are fixed.
        self._placement = placement
        saving = None if placement is None else _saving(placement)
        self._invests = saving is not None and placement.on_miss != "wait" and saving > 0
        self._no_copies = saving is not None and placement.on_miss == "host" and saving <= 0

    def new_step(self) -> None:
        self.step += 1
        self.expected.clear()
        self.value.new_step()
        self._last_tick = None  # the gap across steps (sampling, the head) is not a layer

    def tick(self, now: float) -> None:
        """A MoE layer starts at `now` (seconds, any clock): updates the layer-time average."""
        if self._last_tick is not None and now > self._last_tick:
            gap = now - self._last_tick
            self.layer_s = gap if self.layer_s is None else 0.8 * self.layer_s + 0.2 * gap
        self._last_tick = now

    def close(self) -> None:
        """Drop the references to the loader and the tensors `source` hands out."""
        self.source = None
        self.loader = None

    # -- predictions -----------------------------------------------------------
    def prefetch(self, layer_idx: int, predictions: list[Prediction]) -> None:
        """Turn predictions made at `layer_idx` into prefetch requests."""
        if not predictions:
            return
        self.reap()
        for target, _, experts in predictions:
            self.expected[target] = set(experts)
            if self._invests:
                self.value.predict(target, experts)
        if self._investing():
            self._invest([((t, e), d) for t, d, es in predictions if t > layer_idx for e in es])
            return
        if self._copies_cannot_pay():
            return
        first = bisect.bisect_left(self.moe_layer_ids, layer_idx)
        upcoming = self.moe_layer_ids[first : first + 2]
        later = self.moe_layer_ids[bisect.bisect_right(self.moe_layer_ids, layer_idx) :]
        outstanding = sum(map(len, map(self.cache.unused.__getitem__, later)))  # at C speed: every later layer
        for target, distance, experts in sorted(predictions, key=lambda p: p[1]):
            protected = self._protection(layer_idx, target, set(experts), upcoming)
            for expert_id in experts:
                key = (target, expert_id)
                if key not in self.cache.slot_of and outstanding >= self.max_speculative:
                    return
                reserved = self.cache.prefetch(key, protected=protected)
                if reserved is None:
                    break  # nothing left to evict without hurting nearer layers
                slot, needs_load = reserved
                outstanding += needs_load
                if needs_load:
                    self._load(key, slot, priority=float(distance))

    def _protection(self, layer_idx: int, target: int, predicted: set[int], upcoming: list[int]):
        """What a prefetch for `target` may not evict, as a predicate on resident keys.

        The target layer's experts that the prediction rules out are fair game. Everything else
        is kept when layers up to the target will run with it (resident between the running
        layer and the target, or expected in the next two layers), or when it served its layer
        in the latest pass over it (this token for layers already run, the previous token for
        the rest): routing is sticky from token to token, and on a link-bound device evicting
        those churns the pool and moves more bytes than the prediction saves."""
        step, last_used, expected = self.step, self.last_used, self.expected

        def protected(key: Key) -> bool:
            layer, expert_id = key
            if layer == target:
                return expert_id in predicted
            if layer_idx <= layer <= target:
                return True
            if layer in upcoming and expert_id in expected.get(layer, ()):
                return True
            return last_used.get(key, -2) >= (step if layer < layer_idx else step - 1)

        return protected

    # -- the running layer -------------------------------------------------------
    def _place(self, layer_idx: int, needed: list[int], tokens_on: dict[int, int], placement: Placement) -> list[int]:
        """The routed experts of `needed` that run on the host: those not resident for which
        the host lane finishes first (`placement`). Costs the experts routed, not the pool."""
        resident, state = self.cache.resident[layer_idx], self.cache.state
        if placement.on_miss == "host":  # no choice to weigh: every expert not ready runs on the host
            return [e for e in needed if (slot := resident.get(e)) is None or state[slot] is not SlotState.READY]
        host: list[int] = []
        host_busy = link_busy = 0.0  # work already placed on each lane in this call
        for expert_id in needed:
            slot = resident.get(expert_id)
            if slot is not None and state[slot] is SlotState.READY:
                continue
            tokens, in_flight = tokens_on[expert_id], slot is not None
            left = self.loader.left(slot) if in_flight else 1.0
            if placement.on_host(tokens, in_flight, host_busy, link_busy, left):
                host.append(expert_id)
                host_busy += placement.host_s(tokens)
            else:
                link_busy += placement.link_s() * left
        return host

    def upload(self, layer_idx: int, experts: list[int]) -> None:
        """Experts just served on the host: upload those worth their link time (`_invest`)."""
        if self._investing():
            self._invest([((layer_idx, e), None) for e in experts])
        elif not self._copies_cannot_pay():
            self._upload_recent(layer_idx, experts)

    def _copies_cannot_pay(self) -> bool:
        """Every miss runs on the host and a use on the device saves no host time (a CPU device:
        both lanes are the same cores and the same memory): a copy into a slot only competes with
        the host lane for memory bandwidth, so neither predictions nor host-served experts are
        copied. Issue 19 measured ~89 such uploads per token (~280 MB) on a bf16 CPU run, none used."""
        return self._no_copies

    def _investing(self) -> bool:
        """Whether misses run on the host and a use on the device saves host time, so uploads are
        investments. Where a use saves nothing (a CPU device: both lanes are the same cores) no
        upload could pay, and the rules before uploads were investments apply: predictions are
        prefetched as with `wait`, host-served experts uploaded behind them (`_upload_recent`),
        so a CPU run still moves and evicts experts as a GPU run does (and tests that path)."""
        return self._invests

    def _upload_recent(self, layer_idx: int, experts: list[int]) -> None:
        """Upload experts just served on the host in the background, behind every prediction,
        within `upload_budget` copies in flight, evicting only what a prefetch may evict."""
        in_flight = sum(len(loading) for loading in self.loading.values())
        first = bisect.bisect_left(self.moe_layer_ids, layer_idx)
        protected = self._protection(layer_idx, layer_idx, set(experts), self.moe_layer_ids[first : first + 2])
        for expert_id in experts[: max(0, self.upload_budget - in_flight)]:
            key = (layer_idx, expert_id)
            reserved = self.cache.prefetch(key, protected=protected)
            if reserved is None:
                return
            slot, needs_load = reserved
            if needs_load:
                self._load(key, slot, priority=float(len(self.moe_layer_ids) + 1))

    def _queue_s(self) -> tuple[float, float]:
        """Link seconds the uploads queued or in flight still need: (all of them, those aimed at
        this token). Background uploads yield to the latter chunk by chunk, as in the loaders."""
        link, left, late = self.placement.link_s(), self.loader.left, self._background
        total = urgent = 0.0
        for loading in self.loading.values():
            for slot in loading.values():
                seconds = left(slot) * link
                total += seconds
                if slot not in late:
                    urgent += seconds
        return total, urgent

    def _invest(self, candidates: list[tuple[Key, int | None]]) -> None:
        """Upload each candidate (key, distance of its prediction or None), most valuable first,
        while the link's queue drains within UPLOAD_WINDOW_LAYERS layers, when its expected uses
        (`UploadValue`) beyond its victim's pay for the copy's link time at the current price:
        free on an idle link (but for MIN_GAIN), a full copy's worth of uses as the queue fills
        the window. A victim must be worth less by that much, so the pool does not churn."""
        placement = self.placement
        save = _saving(placement)
        link = placement.link_s()
        full = link / save  # uses that pay for a copy when the link is saturated
        window = UPLOAD_WINDOW_LAYERS * self.layer_s if self.layer_s is not None else self.upload_budget * link
        total, urgent = self._queue_s()
        value, slot_of = self.value, self.cache.slot_of
        scored = []
        for key, distance in candidates:
            if key in slot_of:
                continue
            in_time = distance is not None and self._lands(distance, urgent)
            scored.append((value.uses(key, in_time), key, distance if in_time else None))
        scored.sort(key=lambda s: -s[0])
        for uses, key, distance in scored:
            if total >= window:
                return
            # The link's time is worth what the uploads it displaces would save: nothing while
            # the queue is empty, a full copy's worth of uses as it reaches the window.
            floor = uses - MIN_GAIN - full * min(1.0, total / window)
            if floor <= 0:
                continue
            reserved = self.cache.prefetch(key, protected=lambda k, floor=floor: value.uses(k) >= floor)
            if reserved is None:
                continue
            slot, needs_load = reserved
            if needs_load:
                late = float(len(self.moe_layer_ids) + 1)  # behind every copy aimed at this token
                self._load(key, slot, priority=late if distance is None else float(distance))
                total += link
                if distance is not None:
                    urgent += link

    def _lands(self, distance: int, ahead_s: float) -> bool:
        """Whether an upload behind `ahead_s` seconds of urgent copies lands within `distance`
        layers (at the layer-time average)."""
        return self.layer_s is not None and ahead_s + self.placement.link_s() <= distance * self.layer_s

    def plan(
        self,
        layer_idx: int,
        needed: list[int],
        tokens_on: dict[int, int] | None = None,
        placement: Placement | None = None,
    ) -> tuple[list[int], list[list[int]]]:
        """Called once the running layer's routing is known (`needed`, with the tokens on each
        expert): drop predictions that turned out stale, choose the experts that run on the host
        (`placement`; none without one or with on_miss "wait"), and split the rest into waves
        that fit the pool (resident experts first). Returns (host experts, device waves)."""
        self.reap()
        if self._invests:  # use counts and prediction scores only ever price uploads (`_invest`)
            self.value.used(layer_idx, needed)
        if self.loading[layer_idx] or self.cache.unused[layer_idx]:
            self._forget_stale(layer_idx, set(needed))
        host = []
        if placement is not None and placement.on_miss != "wait":
            host = self._place(layer_idx, needed, tokens_on, placement)
        on_device = [e for e in needed if e not in host] if host else needed
        n = self.cache.num_slots
        if len(on_device) <= n:
            return host, [on_device] if on_device else []
        resident = self.cache.resident[layer_idx]
        ordered = sorted(on_device, key=lambda e: e not in resident)
        return host, [ordered[i : i + n] for i in range(0, len(ordered), n)]

    def hit_all(self, layer_idx: int, needed: list[int]) -> list[int] | None:
        """The fast path of `plan` + `acquire` when every routed expert of the running layer is
        resident and its copy has landed: the same bookkeeping in the same order (stale
        predictions, use counts, hits, policy order), without pins (`ExpertCache.hit_all`).
        Returns the slots of `needed`, or None when any expert is absent or loading (having only
        marked landed copies, as `plan` does first), so the caller takes the general path. The caller releases the slots
        (`Loader.release_all`) once its reads of them are enqueued."""
        self.reap()
        slots = self.cache.ready_slots(layer_idx, needed)
        if slots is None:
            return None
        if self._invests:
            self.value.used(layer_idx, needed)
        if self.loading[layer_idx] or self.cache.unused[layer_idx]:
            self._forget_stale(layer_idx, set(needed))  # touches only experts not in `needed`
        self.cache.hit_all(layer_idx, needed)
        step, last_used = self.step, self.last_used
        for expert_id in needed:
            last_used[(layer_idx, expert_id)] = step
        return slots

    def acquire(self, layer_idx: int, wave: list[int]) -> dict[int, int]:
        """Pin every expert of `wave` in a slot and wait until its copy has landed (the stall)."""
        slots = {e: self._access((layer_idx, e)) for e in wave}
        loading = self.loading[layer_idx]
        for expert_id in wave:
            self.last_used[(layer_idx, expert_id)] = self.step
        try:
            for expert_id, slot in slots.items():
                if loading.pop(expert_id, None) is not None:
                    self.loader.wait(slot, layer_idx)
                self.cache.mark_ready(slot)
        except BaseException:
            self.release(slots.values())
            raise
        return slots

    def release(self, slots) -> None:
        for slot in slots:
            self.loader.release(slot)
            self.cache.unpin(slot)

    def reap(self) -> None:
        """Mark copies that have landed; costs the number of copies in flight."""
        for loading in self.loading.values():
            if loading:
                for expert_id, slot in list(loading.items()):
                    if self.loader.done(slot):
                        self.cache.mark_ready(slot)
                        del loading[expert_id]

    def _access(self, key: Key) -> int:
        try:
            slot, needs_load = self.cache.access(key)
        except CacheCapacityError:
            if not any(self.loading.values()):
                raise
            # Every unpinned slot is in flight: let those copies land, then they can be evicted.
            for loading in self.loading.values():
                for expert_id, slot in list(loading.items()):
                    self.loader.wait(slot, key[0])
                    self.cache.mark_ready(slot)
                    del loading[expert_id]
            slot, needs_load = self.cache.access(key)
        if needs_load:
            self._load(key, slot, priority=DEMAND)
        return slot

    def _load(self, key: Key, slot: int, priority: float) -> None:
        self.loading[key[0]][key[1]] = slot
        if priority > len(self.moe_layer_ids):
            self._background.add(slot)
        else:
            self._background.discard(slot)
        src, dst = self.source(key, slot)
        self.loader.submit(slot, src, dst, priority, tag=key)

    def _forget_stale(self, layer_idx: int, needed: set[int]) -> None:
        """The running layer's prefetches it turned out not to need: cancel queued copies,
        demote (and count wasted) those already resident."""
        loading, unused = self.loading[layer_idx], self.cache.unused[layer_idx]
        for expert_id, slot in list(loading.items()):
            if expert_id not in needed and expert_id in unused and self.loader.cancel(slot):
                del loading[expert_id]
                self.cache.drop((layer_idx, expert_id))
        for expert_id in [e for e in unused if e not in needed]:
            self.cache.demote((layer_idx, expert_id))


def _saving(placement: Placement) -> float:
    """Seconds one decode use of an expert saves on the device rather than the host."""
    return placement.host_s(1) - placement.device_s(1)
