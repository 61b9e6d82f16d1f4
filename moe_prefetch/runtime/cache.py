"""The slot table and its eviction policy: pure bookkeeping, no tensors.

A key is `(layer_idx, expert_id)`. Each of the `num_slots` device slots is EMPTY, LOADING
(a copy is queued or in flight) or READY. Pinned slots (in use by the running layer) and
LOADING slots are never evicted: that is what keeps a kernel from reading a slot that is
being overwritten. The cache owns every hit/miss/prefetch counter, per MoE layer.

Every operation costs in proportion to the keys it touches, never to the pool: per-layer
indexes (`resident`, `unused`) are kept incrementally, and victims are walked lazily from
the least valuable end of the eviction policy (LRU, LFU or LFRU: `make_policy`). At 48
layers x 128 experts and thousands of slots this is what keeps the scheduler's host time
per layer in microseconds.
"""

from __future__ import annotations

import bisect
import enum
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

from ..errors import CacheCapacityError, ConfigError
from .config import CACHE_POLICIES

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


class _Frequencies:
    """Use counts with dynamic aging (LFU-DA), bucketed so every operation is O(1) dict work.

    Modelled on LFU with Dynamic Aging (Arlitt, Cherkasova, Dilley, Friedrich and Jin,
    "Evaluating content management techniques for Web proxy caches", SIGMETRICS PER 27(4),
    2000; Squid's `heap LFUDA`). A key's priority is `age + count`, where `age` is set at the
    key's latest use and `age` is the priority of the latest key evicted. Why this aging rule:
    halving every count now and then costs in proportion to the pool, whereas here old
    popularity decays for free: each eviction raises the floor that new uses start from, so a
    key that was hot long ago is eventually outranked by keys used once since. Keys of equal
    priority go least recently placed first (ties by recency).

    Buckets are keyed by priority; `_order` keeps the distinct priorities sorted (a bisect into a
    short list of ints), so no operation walks the keys.
    """

    def __init__(self) -> None:
        self.age = 0
        self.priority: dict[Key, int] = {}
        self._buckets: dict[int, OrderedDict[Key, None]] = {}
        self._order: list[int] = []  # the buckets' priorities, ascending

    def add(self, key: Key, count: int) -> None:
        priority = self.age + count
        self.priority[key] = priority
        bucket = self._buckets.get(priority)
        if bucket is None:
            bucket = self._buckets[priority] = OrderedDict()
            bisect.insort(self._order, priority)
        bucket[key] = None

    def discard(self, key: Key, evicted: bool) -> None:
        """Take `key` out; `evicted` raises the age to its priority (the LFU-DA clock)."""
        priority = self.priority.pop(key)
        bucket = self._buckets[priority]
        del bucket[key]
        if not bucket:
            del self._buckets[priority]
            del self._order[bisect.bisect_left(self._order, priority)]
        if evicted:
            self.age = max(self.age, priority)

    def __iter__(self) -> Iterator[Key]:
        # Indexing `_order` (not iterating a copy) keeps the start O(1).
        for i in range(len(self._order)):
            yield from self._buckets[self._order[i]]

    def __len__(self) -> int:
        return len(self.priority)

    def __contains__(self, key: object) -> bool:
        return key in self.priority


class LFUPolicy:
    """Eviction order by use count with dynamic aging (see `_Frequencies`), ties by recency.

    `insert` alone (a prefetch) gives a key no use: it ranks below every key that served a
    layer until a `touch` confirms it. `demote` puts a key before all others, most recently
    demoted first, as in LRUPolicy; a later `touch` returns it to the counted order.
    """

    def __init__(self) -> None:
        self.counts: dict[Key, int] = {}
        self._demoted: OrderedDict[Key, None] = OrderedDict()
        self._ranked = _Frequencies()

    def insert(self, key: Key) -> None:
        self.counts[key] = 0
        self._ranked.add(key, 0)

    def touch(self, key: Key) -> None:
        self.counts[key] += 1
        if key in self._demoted:
            del self._demoted[key]
        else:
            self._ranked.discard(key, evicted=False)
        self._ranked.add(key, self.counts[key])

    def demote(self, key: Key) -> None:
        if key in self._ranked:
            self._ranked.discard(key, evicted=False)
        self._demoted[key] = None
        self._demoted.move_to_end(key, last=False)

    def remove(self, key: Key) -> None:
        # The cache removes a key when it evicts it or drops a cancelled prefetch (count 0, so at
        # most the current age): either may advance the aging clock.
        del self.counts[key]
        if key in self._demoted:
            del self._demoted[key]
        else:
            self._ranked.discard(key, evicted=True)

    def victims(self) -> Iterator[Key]:
        """Lazily: demoted keys, then lowest priority first. Stop iterating before changing the policy."""
        yield from self._demoted
        yield from self._ranked

    def __len__(self) -> int:
        return len(self.counts)

    def __contains__(self, key: object) -> bool:
        return key in self.counts


class LFRUPolicy:
    """Least frequently, recently used: a recency-protected segment beside a frequency-ordered one.

    Modelled on LFRU (Bilal and Kang, "A cache management scheme for efficient content eviction
    and replication in cache networks", IEEE Access 5, 2017; described under "LFRU" in
    Wikipedia's "Cache replacement policies"): a privileged partition kept in LRU
    order, and an unprivileged partition evicted by (approximate) LFU. New keys and used keys
    enter the privileged segment; its least recent key overflows into the unprivileged one,
    which is evicted first, lowest count first (LFU-DA, as in LFUPolicy).

    Why two segments rather than one score decayed per access (LRFU): the segments keep every
    operation O(1) dict work, while a decayed score needs a priority queue (O(log n) per use,
    with stale entries to skip in the lazy walk). And each segment does one job a MoE cache
    needs: routing is sticky from token to token, so the experts of the last few tokens are
    protected whatever their count, including prefetched experts not yet used (the recency
    segment holds them until newer keys push them out); beyond that window, experts that are
    hot across many tokens outlive ones used once in a scan.

    The privileged segment holds `window` of the keys (at least one). The policy is not told
    the pool size, so the share is of the keys it holds; in a full cache that is the pool.
    """

    def __init__(self, window: float = 0.5) -> None:
        if not 0.0 < window <= 1.0:
            raise ValueError(f"window={window!r} must be in (0, 1]")
        self.window = window
        self.counts: dict[Key, int] = {}
        self._demoted: OrderedDict[Key, None] = OrderedDict()
        self._recent: OrderedDict[Key, None] = OrderedDict()  # privileged, least recent first
        self._ranked = _Frequencies()  # unprivileged

    def insert(self, key: Key) -> None:
        self.counts[key] = 0
        self._recent[key] = None
        self._rebalance()

    def touch(self, key: Key) -> None:
        self.counts[key] += 1
        if key in self._recent:
            self._recent.move_to_end(key)
            return
        if key in self._demoted:
            del self._demoted[key]
        else:
            self._ranked.discard(key, evicted=False)
        self._recent[key] = None
        self._rebalance()

    def demote(self, key: Key) -> None:
        if key in self._recent:
            del self._recent[key]
        elif key in self._ranked:
            self._ranked.discard(key, evicted=False)
        self._demoted[key] = None
        self._demoted.move_to_end(key, last=False)
        self._rebalance()

    def remove(self, key: Key) -> None:
        del self.counts[key]
        if key in self._demoted:
            del self._demoted[key]
        elif key in self._recent:
            del self._recent[key]
        else:
            self._ranked.discard(key, evicted=True)
        self._rebalance()

    def _rebalance(self) -> None:
        # Each operation changes the number of keys by at most one, so this moves at most two.
        limit = max(1, int(self.window * len(self.counts)))
        while len(self._recent) > limit:
            key, _ = self._recent.popitem(last=False)
            self._ranked.add(key, self.counts[key])

    def victims(self) -> Iterator[Key]:
        """Lazily: demoted keys, the frequency segment lowest first, then the recency segment
        least recent first. Stop iterating before changing the policy."""
        yield from self._demoted
        yield from self._ranked
        yield from self._recent

    def __len__(self) -> int:
        return len(self.counts)

    def __contains__(self, key: object) -> bool:
        return key in self.counts


class Policy(Protocol):
    """What ExpertCache needs from an eviction policy (LRUPolicy, LFUPolicy, LFRUPolicy).

    `insert` a key that gained a slot (a prefetch: not yet a use), `touch` it at each use,
    `demote` a wrong prediction to the front, `remove` it when it loses its slot. `victims()`
    yields every key, least valuable first, lazily: starting it and each step cost O(1)."""

    def insert(self, key: Key) -> None: ...
    def touch(self, key: Key) -> None: ...
    def demote(self, key: Key) -> None: ...
    def remove(self, key: Key) -> None: ...
    def victims(self) -> Iterator[Key]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...


_POLICIES: dict[str, Callable[[], Policy]] = {"lru": LRUPolicy, "lfu": LFUPolicy, "lfru": LFRUPolicy}
assert tuple(_POLICIES) == CACHE_POLICIES


def make_policy(name: str) -> Policy:
    """A fresh eviction policy by its `RuntimeConfig.cache_policy` name: "lru", "lfu" or "lfru"."""
    if name not in _POLICIES:
        raise ConfigError(f"unknown cache_policy {name!r}; choose one of {', '.join(CACHE_POLICIES)}")
    return _POLICIES[name]()


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
    # CUDA: host seconds the compute thread blocked until a copy's last chunk was on the copy
    # stream (the stall, the compute stream's wait, is timed apart by events); 0 on CPU, where
    # that block is the stall.
    blocked_seconds: float = 0.0
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

    def __init__(self, num_slots: int, expert_bytes: int, layer_ids: Iterable[int], policy: Policy | None = None):
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
        # Free slots, ascending. A layer takes the free slot nearest its home (its share of the
        # pool, in layer order), so while the pool fills each layer's experts sit together and
        # the kernel can run on a span of the pool instead of a gathered copy (runtime.py).
        self._free: list[int] = list(range(num_slots))
        self.counters: dict[int, Counters] = {layer: Counters() for layer in layer_ids}
        self._home = {layer: i * num_slots // len(self.counters) for i, layer in enumerate(self.counters)}
        # Per-layer indexes, kept incrementally: expert_id -> slot, and unused prefetches.
        self.resident: dict[int, dict[int, int]] = {layer: {} for layer in self.counters}
        self.unused: dict[int, set[int]] = {layer: set() for layer in self.counters}
        self.layer_version: dict[int, int] = dict.fromkeys(self.counters, 0)  # bumped when a layer's keys change

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
        self.policy.touch(key)  # a demand load is a use; `insert` alone (a prefetch) is not
        counters.misses += 1
        counters.bytes_loaded += self.expert_bytes
        self.pins[slot] += 1
        return slot, True

    def ready_slots(self, layer_idx: int, experts: list[int]) -> list[int] | None:
        """The slots of `experts` of layer `layer_idx` if every one is READY, else None."""
        resident, state = self.resident[layer_idx], self.state
        slots = []
        for expert_id in experts:
            slot = resident.get(expert_id)
            if slot is None or state[slot] is not SlotState.READY:
                return None
            slots.append(slot)
        return slots

    def hit_all(self, layer_idx: int, experts: list[int]) -> None:
        """Demand accesses of the running layer to `experts`, every one READY (`ready_slots`):
        what `access` counts for each (a hit, a prefetch used), the policy touched in the same
        order, but no pins. The caller enqueues its reads of these slots before anything can
        evict them (one thread drives the cache), and on CUDA records their release events after."""
        counters, touch, unused = self.counters[layer_idx], self.policy.touch, self.unused[layer_idx]
        counters.hits += len(experts)
        for expert_id in experts:
            key = (layer_idx, expert_id)
            if unused and expert_id in unused:
                self._forget_unused(key)
                counters.prefetch_used += 1
            touch(key)

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
        bisect.insort(self._free, slot)
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
            # The first free slot at or above the layer's home, else the nearest below it.
            i = bisect.bisect_left(self._free, self._home[key[0]])
            slot = self._free.pop(i if i < len(self._free) else i - 1)
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
