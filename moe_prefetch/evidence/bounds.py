"""Bounds on a simulated configuration's tokens/s, to read its figures against.

- `three_lane_bound`: this replay's. Each token's misses, given the pool the token starts with,
  split ideally between the host lane and the link, the device computing the rest, the lanes in
  parallel. What placement and prefetching leave on the table within each token.
- `config_bound`: the configuration's. Belady's MIN with bypass on the same trace and slots (the
  fewest misses any cache can have, `belady_misses`), the host lane and the link shared ideally
  over the whole run, the CPU lane per token. No eviction policy, predictor or placement beats it.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..runtime.placement import Placement

# `roofline` below is a `sim.Roofline` (not imported: sim imports this module).


def three_lane_bound(
    work: list[tuple[int, list[float]]], roofline, lanes: Placement, num_layers: int, cpu_token: float = 0.0
) -> float:
    """Tokens/s if every token's misses were split ideally between the host lane and the link.

    `work` holds, per decode token, (routed experts, misses): a miss is a routed expert that
    was not on the device when the token began, given as the share of its copy still to move
    then (1.0 if absent, less if its upload was under way). The device computes the dense part
    and every routed expert not sent to the host; x misses run on the host (one decode call
    each), the others' copies cross the link, the three lanes in parallel, never waiting on
    each other, and no token is faster than its CPU time (`cpu_token`). For each x the host takes
    the misses with the most copy left:

        token >= max(cpu, min over x of max(dense + (routed - x) * device, x * host, link time of the rest))

    Whatever a replay does within the token (placement, prefetches, waits), its misses take
    these lanes at least this long, so the bound's tokens/s is at least the replay's; the ratio
    is what placement and prefetching leave on the table given the pool each token starts with.
    Uploads that shaped that pool in earlier tokens are not charged to it: it is this replay's
    bound, not the configuration's (`config_bound`)."""
    if not work:
        return 0.0
    dense = num_layers * roofline.dense(1) + roofline.head_bytes / roofline.hbm_bandwidth
    device = roofline.expert_bytes / roofline.hbm_bandwidth  # one expert read once (decode is bytes-bound)
    host, link = lanes.host_s(1), lanes.link_s()
    seconds = 0.0
    for routed, misses in work:
        shares = sorted(misses, reverse=True)
        rest = sum(shares)  # link time (in copies) of the misses not on the host
        best = max(dense + routed * device, rest * link)
        for x, share in enumerate(shares, 1):
            rest -= share
            best = min(best, max(dense + (routed - x) * device, x * host, rest * link))
        seconds += max(cpu_token, best)
    return len(work) / seconds


def belady_misses(accesses: list, slots: int) -> int:
    """Fewest misses any cache of `slots` entries can have on `accesses` (keys in order), when a
    miss may also be served without caching it (the host lane) and the cache may start with
    whatever it likes: Belady's MIN with bypass, the first `slots` distinct keys free.

    On a miss with the cache full, MIN keeps the keys used soonest again: it evicts the one whose
    next use is furthest, or bypasses the new key if its own next use is further still. No
    replacement policy does better, and prefetching cannot either: a prefetch is a fetch made
    early, and any schedule of fetches can be made lazy without adding one."""
    if slots <= 0:
        return sum(1 for _ in accesses)
    never = len(accesses)
    next_use = [never] * len(accesses)
    last: dict = {}
    for i in range(len(accesses) - 1, -1, -1):
        next_use[i] = last.get(accesses[i], never)
        last[accesses[i]] = i
    cached: dict = {}  # key -> its next use
    heap: list[tuple[int, int, object]] = []  # (-next use, seq, key); stale entries are skipped
    order = itertools.count()
    misses = 0
    for i, key in enumerate(accesses):
        nxt = next_use[i]
        if key in cached:
            cached[key] = nxt
            heapq.heappush(heap, (-nxt, next(order), key))
            continue
        if len(cached) < slots:  # filling: as good as having started with it
            cached[key] = nxt
            heapq.heappush(heap, (-nxt, next(order), key))
            continue
        misses += 1
        while heap and cached.get(heap[0][2]) != -heap[0][0]:
            heapq.heappop(heap)
        furthest = -heap[0][0]
        if nxt >= furthest:
            continue  # bypass: this key is needed later than anything cached
        victim = heapq.heappop(heap)[2]
        del cached[victim]
        cached[key] = nxt
        heapq.heappush(heap, (-nxt, next(order), key))
    return misses


def config_bound(
    tokens: list[list], slots: int, roofline, lanes: Placement, num_layers: int, cpu_token: float = 0.0
) -> float:
    """Tokens/s no eviction policy, predictor or placement can beat on this trace with `slots`
    slots: `tokens` holds each measured decode token's routed (layer, expert) keys in order.

    M = Belady's misses over the whole window (`belady_misses`). X of the R routed experts run on the
    host lane (any of them: a placement may send an expert there that an ideal cache would have
    held), and at most X of the M misses are served that way; the rest cross the link at any time in
    the window (prefetching can move a copy to any earlier moment, so the link is charged over the
    window, not per token); the device reads the dense part and every routed expert not on the
    host; every token takes at least its CPU time:

        window >= min over X in 0..R of max(tokens x cpu, dense + (R - X) x device, X x host, max(0, M - X) x link)"""
    if not tokens:
        return 0.0
    accesses = [key for keys in tokens for key in keys]
    misses = belady_misses(accesses, slots)
    routed = len(accesses)
    dense = len(tokens) * (num_layers * roofline.dense(1) + roofline.head_bytes / roofline.hbm_bandwidth)
    device = roofline.expert_bytes / roofline.hbm_bandwidth
    host, link = lanes.host_s(1), lanes.link_s()
    floor = len(tokens) * cpu_token
    best = math.inf
    for x in range(routed + 1):
        best = min(best, max(floor, dense + (routed - x) * device, x * host, max(0, misses - x) * link))
    return len(tokens) / best
