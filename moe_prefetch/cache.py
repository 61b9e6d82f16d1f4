"""The slot table and its eviction policy: pure bookkeeping, no tensors.

A key is `(layer_idx, expert_id)`. Each of the `num_slots` device slots is EMPTY, LOADING
(a copy is queued or in flight) or READY. Pinned slots (in use by the running layer) and
LOADING slots are never evicted: that is what keeps a kernel from reading a slot that is
being overwritten. The cache owns every hit/miss/prefetch counter, per MoE layer.

Every operation costs in proportion to the keys it touches, never to the pool: per-layer
indexes (`resident`, `unused`) are kept incrementally, and victims are walked lazily from
the least recently used end. At 48 layers x 128 experts and thousands of slots this is what
keeps the scheduler's host time per layer in microseconds.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

from .errors import CacheCapacityError

Key = tuple[int, int]  # (layer_idx, expert_id)
Protected = Callable[[Key], bool] | set | frozenset  # keys a prefetch may not evict

# A prefetch gives up after looking at this many eviction candidates: prediction is optional,
# and walking the whole LRU list when nothing may be evicted would cost in proportion to the pool.
PREFETCH_VICTIM_WALK = 64


class SlotState(enum.Enum):
    EMPTY = 0
    LOADING = 1
    READY = 2


class LRUPolicy:
    """Eviction order only. `victims()` yields keys least recently used first.

    A key can be demoted to the front (a prediction that turned out wrong is the first to go)
    or inserted cold (a prefetch not yet confirmed by any routing decision).
    """

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: Key) -> None:
        self._order.move_to_end(key)

    def demote(self, key: Key) -> None:
        self._order.move_to_end(key, last=False)

    def remove(self, key: Key) -> None:
        del self._order[key]

    def victims(self) -> Iterator[Key]:
        """Lazily, least recently used first. Stop iterating before changing the policy."""
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


@dataclass
class Counters:
    """What happened to one MoE layer's experts. `hits`/`misses` count demand accesses."""

    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0  # evicted or dropped without ever being used
    prefetch_dropped: int = 0  # stale prefetches cancelled before their copy started
    evictions: int = 0
    bytes_loaded: int = 0
    stall_seconds: float = 0.0
    host_experts: int = 0  # routed experts computed on the host lane (not counted in hits/misses)
    host_seconds: float = 0.0

    def add(self, other: Counters) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


class ExpertCache:
    """Maps keys to slots, decides evictions and counts what happens.

    Callers drive it from one thread (the compute thread); loaders only report completion
    through `mark_ready`, which the runtime calls on the compute thread.
    """

    def __init__(self, num_slots: int, expert_bytes: int, layer_ids: Iterable[int], policy: LRUPolicy | None = None):
        if num_slots < 1:
            raise CacheCapacityError(f"cache needs at least 1 slot, got {num_slots}; raise cache_slots")
        self.num_slots = num_slots
        self.expert_bytes = expert_bytes
        self.policy = policy if policy is not None else LRUPolicy()  # an empty policy is falsy (__len__)
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * num_slots
        self.state: list[SlotState] = [SlotState.EMPTY] * num_slots
        self.pins: list[int] = [0] * num_slots
        self.unused_prefetch: set[Key] = set()
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self.counters: dict[int, Counters] = {layer: Counters() for layer in layer_ids}
        # Per-layer indexes, kept incrementally: expert_id -> slot, and unused prefetches.
        self.resident: dict[int, dict[int, int]] = {layer: {} for layer in self.counters}
        self.unused: dict[int, set[int]] = {layer: set() for layer in self.counters}
        self.version = 0  # bumped whenever a key gains or loses its slot
        self.layer_version: dict[int, int] = dict.fromkeys(self.counters, 0)  # the same, per layer

    # -- queries -------------------------------------------------------------
    def lookup(self, key: Key) -> int | None:
        return self.slot_of.get(key)

    def evictable(self, slot: int) -> bool:
        return self.pins[slot] == 0 and self.state[slot] is SlotState.READY

    # -- transitions ---------------------------------------------------------
    def access(self, key: Key) -> tuple[int, bool]:
        """Demand access by the running layer: returns (slot, needs_load) and pins the slot.

        Raises CacheCapacityError when every slot is pinned or in flight.
        """
        counters = self.counters[key[0]]
        slot = self.slot_of.get(key)
        if slot is not None:
            counters.hits += 1
            if key in self.unused_prefetch:
                self._forget_unused(key)
                counters.prefetch_used += 1
            self.policy.touch(key)
            self.pins[slot] += 1
            return slot, False
        slot = self._allocate(key, protected=None)
        if slot is None:
            raise CacheCapacityError(
                f"no free slot for layer {key[0]} expert {key[1]}: all {self.num_slots} slots are in use or in flight; "
                "raise cache_slots"
            )
        counters.misses += 1
        counters.bytes_loaded += self.expert_bytes
        self.pins[slot] += 1
        return slot, True

    def prefetch(self, key: Key, protected: Protected | None = None) -> tuple[int, bool] | None:
        """Reserve a slot for a predicted expert: (slot, needs_load), or None if only a
        protected, pinned or in-flight slot could be taken (among the first
        PREFETCH_VICTIM_WALK candidates). `protected` is a set of keys or a predicate.
        Never counts a hit or miss."""
        slot = self.slot_of.get(key)
        if slot is not None:
            return slot, False
        if isinstance(protected, (set, frozenset)):
            protected = protected.__contains__
        slot = self._allocate(key, protected, walk=PREFETCH_VICTIM_WALK)
        if slot is None:
            return None
        counters = self.counters[key[0]]
        counters.prefetch_issued += 1
        counters.bytes_loaded += self.expert_bytes
        self.unused_prefetch.add(key)
        self.unused[key[0]].add(key[1])
        return slot, True

    def mark_ready(self, slot: int) -> None:
        if self.state[slot] is SlotState.LOADING:
            self.state[slot] = SlotState.READY

    def unpin(self, slot: int) -> None:
        assert self.pins[slot] > 0, f"slot {slot} unpinned more often than pinned"
        self.pins[slot] -= 1

    def drop(self, key: Key) -> None:
        """Forget a prefetch whose copy was cancelled before it started."""
        slot = self._unmap(key)
        assert self.pins[slot] == 0, "a pinned slot cannot be dropped"
        self._free.append(slot)
        counters = self.counters[key[0]]
        counters.prefetch_dropped += 1
        counters.bytes_loaded -= self.expert_bytes
        if key in self.unused_prefetch:
            self._forget_unused(key)
            counters.prefetch_wasted += 1

    def demote(self, key: Key) -> None:
        """A prediction that turned out wrong: make it the first candidate for eviction, and
        count it wasted now (its layer ran without it); a later use is a plain hit."""
        if key in self.policy:
            self.policy.demote(key)
        if key in self.unused_prefetch:
            self._forget_unused(key)
            self.counters[key[0]].prefetch_wasted += 1

    def add_stall(self, layer_idx: int, seconds: float) -> None:
        self.counters[layer_idx].stall_seconds += seconds

    def _allocate(self, key: Key, protected: Callable[[Key], bool] | None, walk: int | None = None) -> int | None:
        if self._free:
            slot = self._free.pop()
        else:
            victim = self._victim(protected, walk)
            if victim is None:
                return None
            slot = self._evict(victim)
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.state[slot] = SlotState.LOADING
        self.policy.insert(key)
        self.resident[key[0]][key[1]] = slot
        self._bump(key[0])
        return slot

    def _victim(self, protected: Callable[[Key], bool] | None, walk: int | None) -> Key | None:
        """The first evictable, unprotected key in policy order, looking at most at `walk` keys."""
        for seen, key in enumerate(self.policy.victims()):
            if walk is not None and seen >= walk:
                return None
            if self.evictable(self.slot_of[key]) and (protected is None or not protected(key)):
                return key
        return None

    def _evict(self, key: Key) -> int:
        slot = self._unmap(key)
        counters = self.counters[key[0]]
        counters.evictions += 1
        if key in self.unused_prefetch:
            self._forget_unused(key)
            counters.prefetch_wasted += 1
        return slot

    def _unmap(self, key: Key) -> int:
        slot = self.slot_of.pop(key)
        self.policy.remove(key)
        self.key_of[slot] = None
        self.state[slot] = SlotState.EMPTY
        del self.resident[key[0]][key[1]]
        self._bump(key[0])
        return slot

    def _bump(self, layer_idx: int) -> None:
        self.version += 1
        self.layer_version[layer_idx] += 1

    def _forget_unused(self, key: Key) -> None:
        self.unused_prefetch.discard(key)
        self.unused[key[0]].discard(key[1])

    # -- reporting -----------------------------------------------------------
    def totals(self) -> Counters:
        total = Counters()
        for counters in self.counters.values():
            total.add(counters)
        return total

    def reset_counters(self) -> None:
        for layer in self.counters:
            self.counters[layer] = Counters()

    def check(self) -> None:
        """Internal consistency, for tests and debug mode."""
        assert len(self.slot_of) + len(self._free) == self.num_slots
        for key, slot in self.slot_of.items():
            assert self.key_of[slot] == key and self.state[slot] is not SlotState.EMPTY
        for slot in self._free:
            assert self.key_of[slot] is None and self.pins[slot] == 0
        assert set(self.slot_of) == set(self.policy.victims())
        assert self.unused_prefetch <= set(self.slot_of)
        assert {(l, e): s for l, d in self.resident.items() for e, s in d.items()} == self.slot_of
        assert {(l, e) for l, es in self.unused.items() for e in es} == self.unused_prefetch
