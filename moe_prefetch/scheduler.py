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
  turned out wrong is counted wasted and demoted to be the first evicted.
"""

from __future__ import annotations

from collections.abc import Callable

from .cache import ExpertCache, Key
from .errors import CacheCapacityError
from .loader import DEMAND, Loader

Prediction = tuple[int, int, list[int]]  # (target layer_idx, distance d, expert ids best first)


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
        self.moe_layer_ids = list(moe_layer_ids)
        self.loading: dict[Key, int] = {}  # keys whose copies are queued or in flight
        self.expected: dict[int, set[int]] = {}  # latest prediction per target layer
        self.step = -1
        self.last_used: dict[Key, int] = {}  # step in which each key last served its layer

    def new_step(self) -> None:
        self.step += 1
        self.expected.clear()

    def prefetch(self, layer_idx: int, predictions: list[Prediction]) -> None:
        """Turn predictions made at the start of `layer_idx` into prefetch requests."""
        if not predictions:
            return
        self.reap()
        for target, _, experts in predictions:
            self.expected[target] = set(experts)
        upcoming = [t for t in self.moe_layer_ids if t >= layer_idx][:2]
        expected = {(t, e) for t in upcoming for e in self.expected.get(t, ())}
        recent = self._recent(layer_idx)
        outstanding = sum(1 for key in self.cache.unused_prefetch if key[0] > layer_idx)
        for target, distance, experts in sorted(predictions, key=lambda p: p[1]):
            # What a prefetch may evict, least recently used first: the target layer's experts
            # that the prediction says this token will not use, and experts that served nobody
            # in the latest pass over their layer. Never what layers up to the target will run
            # with, nor another layer's recent experts: routing is sticky from token to token,
            # and on a link-bound device that churn moves more bytes than the prediction saves.
            predicted = set(experts)
            keep = expected | self._resident_between(layer_idx, target) | recent
            protected = {k for k in keep if k[0] != target or k[1] in predicted}
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

    def _resident_between(self, first: int, last: int) -> set[Key]:
        return {key for key in self.cache.slot_of if first <= key[0] <= last}

    def _recent(self, layer_idx: int) -> set[Key]:
        """Experts that served their layer in the latest pass over it (this token for layers
        already run, the previous token for the rest). Routing is sticky from token to token,
        so these are the likeliest hits: a speculative prefetch may not evict them, or the
        pool churns and a transfer-bound link moves the same experts again and again."""
        step, last_used = self.step, self.last_used
        return {k for k in self.cache.slot_of if last_used.get(k, -2) >= (step if k[0] < layer_idx else step - 1)}

    def plan(self, layer_idx: int, needed: list[int]) -> list[list[int]]:
        """Called once the running layer's routing is known: drop what turned out stale and
        split `needed` into waves that fit the pool (resident experts first)."""
        if self.loading:
            self.reap()
        if self.loading or self.cache.unused_prefetch:
            self._forget_stale(layer_idx, set(needed))
        n = self.cache.num_slots
        if len(needed) <= n:
            return [needed]
        ordered = sorted(needed, key=lambda e: self.cache.lookup((layer_idx, e)) is None)
        return [ordered[i : i + n] for i in range(0, len(ordered), n)]

    def acquire(self, layer_idx: int, wave: list[int]) -> dict[int, int]:
        """Pin every expert of `wave` in a slot and wait until its copy has landed (the stall)."""
        slots = {e: self._access((layer_idx, e)) for e in wave}
        for expert_id in wave:
            self.last_used[(layer_idx, expert_id)] = self.step
        try:
            for expert_id, slot in slots.items():
                self.loader.wait(slot, layer_idx)
                self.loading.pop((layer_idx, expert_id), None)
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
        for key, slot in list(self.loading.items()):
            if self.loader.done(slot):
                self.cache.mark_ready(slot)
                del self.loading[key]

    def _access(self, key: Key) -> int:
        try:
            slot, needs_load = self.cache.access(key)
        except CacheCapacityError:
            if not self.loading:
                raise
            # Every unpinned slot is in flight: let those copies land, then they can be evicted.
            for loading_key, slot in list(self.loading.items()):
                self.loader.wait(slot, key[0])
                self.cache.mark_ready(slot)
                del self.loading[loading_key]
            slot, needs_load = self.cache.access(key)
        if needs_load:
            self._load(key, slot, priority=DEMAND)
        return slot

    def _load(self, key: Key, slot: int, priority: float) -> None:
        self.loading[key] = slot
        src, dst = self.source(key, slot)
        self.loader.submit(slot, src, dst, priority, tag=key)

    def _forget_stale(self, layer_idx: int, needed: set[int]) -> None:
        for key, slot in list(self.loading.items()):
            stale = key[0] < layer_idx or (key[0] == layer_idx and key[1] not in needed)
            if stale and key in self.cache.unused_prefetch and self.loader.cancel(slot):
                del self.loading[key]
                self.cache.drop(key)
        for key in list(self.cache.unused_prefetch):
            if key[0] == layer_idx and key[1] not in needed:
                self.cache.demote(key)
