"""Trace-driven simulator: replay a recorded routing trace through the same scheduler.

The recorded trace fixes what the model routed to (and, for next-gate/m2r2, what the
predictor said at each layer). We replay it through `Scheduler` + `ExpertCache` (the very
code the runtime uses) with a virtual link in place of the loader: copies run one at a
time at the profile's host-to-device bandwidth, chunk by chunk, the most urgent first (a
demand copy waits for the chunk in progress, as with the runtime's loaders). Compute comes
either from the trace's own measurements (used to validate the simulator against a paced CPU
run) or from a roofline of the model's bytes and FLOPs on the profile; with a `Placement`
the host lane runs beside it.

Per decode token the result splits time into compute and exposed transfer (stall), and
gives the three-lane bound of the replay (`three_lane_bound`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
from dataclasses import dataclass

from ..errors import ConfigError
from ..experts.layout import dense_bytes
from ..runtime.cache import ExpertCache, make_policy
from ..runtime.lanes import prefetch_recall
from ..runtime.loader import CHUNK_BYTES, DEMAND, Loader
from ..runtime.placement import LaneCosts, Placement, device_call_s
from ..runtime.scheduler import Scheduler
from .anatomy import kv_layers
from .bounds import config_bound, three_lane_bound


class Clock:
    """Virtual time, in seconds."""

    def __init__(self) -> None:
        self.now = 0.0


class SimLoader(Loader):
    """A single link of `bandwidth` bytes/s, serving copies in priority order, chunk by chunk.

    As the runtime's loaders do (`loader._WorkerLoader`), a copy moves in chunks of
    `chunk_bytes`, and between chunks a more urgent copy goes first: a demand copy waits for
    at most the chunk in progress, never for a whole speculative expert. A copy whose first
    chunk has started can no longer be cancelled."""

    kind = "simulated"

    def __init__(
        self, num_slots: int, clock: Clock, bandwidth: float, expert_bytes: int, chunk_bytes: int = CHUNK_BYTES
    ):
        super().__init__(num_slots)
        self.clock = clock
        self.duration = expert_bytes / bandwidth
        self.chunk_s = min(chunk_bytes, expert_bytes) / bandwidth
        self.expert_bytes = expert_bytes
        self.reason = f"simulated link at {bandwidth / 1e9:.3g} GB/s"
        self._heap: list[tuple[float, int, int]] = []  # (priority, seq, slot); stale entries are skipped
        self._queued: dict[int, int] = {}  # slot -> seq of its live entry
        self._left: dict[int, float] = {}  # slot -> link seconds still to move
        self._began: dict[int, float] = {}  # slot -> when its first chunk started
        self._finish: dict[int, float] = {}
        self._link_free = 0.0  # the link is busy (with a committed chunk) until then
        self._count = itertools.count()

    def submit(self, slot, src, dst, priority, tag=None):
        self._run_until(self.clock.now)
        self._push(slot, priority)
        self._left[slot] = self.duration
        self._began.pop(slot, None)
        self._finish.pop(slot, None)
        self._run_until(self.clock.now)  # an idle link starts it at once

    def _push(self, slot: int, priority: float) -> None:
        seq = next(self._count)
        self._queued[slot] = seq
        heapq.heappush(self._heap, (priority, seq, slot))

    def _top(self) -> int | None:
        while self._heap and self._queued.get(self._heap[0][2]) != self._heap[0][1]:
            heapq.heappop(self._heap)  # cancelled, promoted or finished
        return self._heap[0][2] if self._heap else None

    def _run_until(self, t: float, until_done: int | None = None) -> None:
        """Move copies, most urgent first, up to time `t` (or until slot `until_done` has
        landed). A copy under way at `t` keeps the link to the end of its current chunk."""
        while (slot := self._top()) is not None:
            start = self._link_free
            if start > t:
                return
            self._began.setdefault(slot, start)
            left = self._left[slot]
            if start + left > t:  # under way at t: at least its first chunk is committed
                moved = max(1, math.ceil((t - start) / self.chunk_s - 1e-9)) * self.chunk_s
                if moved < left - 1e-12:
                    self._left[slot] = left - moved
                    self._link_free = start + moved
                    return
            self._link_free = self._finish[slot] = start + left
            self._left[slot] = 0.0
            del self._queued[slot]
            self.events.append(
                {"slot": slot, "start": self._began[slot], "end": self._link_free, "bytes": self.expert_bytes}
            )
            if slot == until_done:
                return
        if t != float("inf"):
            self._link_free = max(self._link_free, t)  # the link idles until t

    def left(self, slot):
        self._run_until(self.clock.now)
        return self._left.get(slot, 0.0) / self.duration if slot in self._queued else 0.0

    def done(self, slot):
        self._run_until(self.clock.now)
        return slot not in self._queued and self._finish.get(slot, 0.0) <= self.clock.now

    def wait(self, slot, layer_idx):
        self._run_until(self.clock.now)
        if slot in self._queued:  # needed now: ahead of every prefetch
            self._push(slot, DEMAND)
            self._run_until(float("inf"), until_done=slot)
        stall = max(0.0, self._finish.get(slot, 0.0) - self.clock.now)
        self.clock.now += stall
        self._stalls[layer_idx] += stall

    def cancel(self, slot):
        if slot in self._queued and slot not in self._began:
            del self._queued[slot]
            return True
        return False


@dataclass
class Roofline:
    """Compute time of one layer on a device: max(bytes / HBM bandwidth, FLOPs / peak)."""

    hbm_bandwidth: float
    peak_flops: float
    dense_bytes_per_layer: float  # attention, norms, router: read once per forward
    expert_bytes: int  # what one device call on an expert reads (stored bytes + decode traffic)
    expert_params: int
    head_bytes: float = 0.0  # lm_head read + one embedding row, once per forward
    kv_bytes_per_layer: float = 0.0  # KV cache a decode token's attention reads, per layer (mean)

    def moe(self, tokens: int, distinct: int, top_k: int) -> float:
        return device_call_s(
            self.expert_bytes, self.expert_params, tokens * top_k, self.hbm_bandwidth, self.peak_flops, distinct
        )

    def dense(self, tokens: int) -> float:
        return max(
            (self.dense_bytes_per_layer + self.kv_bytes_per_layer) / self.hbm_bandwidth,
            2 * tokens * self.dense_bytes_per_layer / 2 / self.peak_flops,
        )


@dataclass(frozen=True)
class CpuLane:
    """The CPU side of a decode token, the fourth lane (host profiles' `framework_layer_s`,
    `runtime_layer_s`, `framework_token_s`): at batch 1 the routing read blocks every MoE layer,
    so the CPU never runs ahead of the device; a layer takes at least its CPU time, and the
    generate loop's own time comes after the head, while the device idles."""

    layer_s: float = 0.0  # stock transformers' eager forward, per decoder layer
    moe_layer_s: float = 0.0  # the runtime's own, per MoE layer
    token_s: float = 0.0  # generate's loop, per token

    @classmethod
    def of(cls, host) -> CpuLane:
        return cls(host.framework_layer_s, host.runtime_layer_s, host.framework_token_s)

    def per_token(self, num_layers: int, moe_layers: int) -> float:
        return num_layers * self.layer_s + moe_layers * self.moe_layer_s + self.token_s


def simulate(
    trace: list[dict],
    *,
    cache_slots: int,
    expert_bytes: int,
    bandwidth: float,
    moe_layer_ids: list[int],
    num_layers: int,
    predictions: list[dict] | None = None,
    step_starts: list[float] | None = None,
    roofline: Roofline | None = None,
    top_k: int = 2,
    predictor: str = "recorded",
    lookahead: int = 1,
    placement: Placement | None = None,
    host_overlaps: bool = True,
    lanes: Placement | None = None,
    policy: str = "lru",
    cpu: CpuLane | None = None,
    warmup: int = 0,
) -> dict:
    """Replay `trace` (runtime.trace records) and return per-token times and totals.

    `placement` (the runtime's own `Placement`, with a profile's lane costs) adds the host lane:
    a routed expert that is not resident runs on the host when that finishes first, beside the
    device's compute (a layer takes the longer of the two), and is then uploaded in the
    background, exactly as the runtime's scheduler decides. None: every miss waits (pre-hybrid).
    `host_overlaps=False` when the replayed device is the host CPU itself (a CPU run): there the
    host lane shares the device's cores and runs after the layer's device part, as the runtime does.
    `cpu` adds the CPU lane (`CpuLane`): no layer finishes before its CPU time, and each token
    pays the generate loop's.

    `predictor`: "recorded" replays `predictions` as recorded; "none" prefetches nothing;
    "oracle" and "previous-token" are rebuilt from the trace itself.
    With `roofline` compute is modelled; without it the trace's measured compute is used
    (needs `step_starts`). `policy` names the cache's eviction policy (`cache.make_policy`).

    `warmup`: the first `warmup` decode tokens are the cold start (the cache fills from the
    prefill's state); the figures (`tokens_per_s`, hit rates) are the steady state after them,
    and `cold_start_tokens_per_s` is the warm-up's own speed.

    With `roofline` and `lanes` (the lane speeds; default `placement`) the result also holds two
    bounds: `bound_tokens_per_s`, the three-lane bound of this replay (`three_lane_bound`), and
    `config_bound_tokens_per_s`, the bound of the configuration (`config_bound`): Belady's MIN
    eviction on the same trace and slots, its misses split ideally between the host lane and the
    link, which no eviction policy or predictor beats."""
    lanes = lanes or placement
    clock = Clock()
    cache = ExpertCache(cache_slots, expert_bytes, moe_layer_ids, policy=make_policy(policy))
    loader = SimLoader(cache_slots, clock, bandwidth, expert_bytes)
    scheduler = Scheduler(cache, loader, lambda key, slot: (None, None), moe_layer_ids, top_k=top_k)
    scheduler.placement = placement
    by_step: dict[int, list[dict]] = {}
    for record in trace:
        by_step.setdefault(record["step"], []).append(record)
    said = _predictions(predictor, trace, predictions or [], moe_layer_ids, lookahead)
    tokens = []
    work: list[tuple[int, list[float]]] = []  # per token: (routed experts, misses as shares of a copy)
    host_exposed = host_busy = 0.0
    host_experts = 0
    steps = sorted(by_step)
    if warmup and warmup >= len(steps) - 1:
        raise ConfigError(
            f"the trace has {len(steps) - 1} decode tokens and warmup is {warmup}: nothing is left to measure; "
            "lower --warmup or record a longer run (--max-new-tokens)"
        )
    first_measured = steps[0] + warmup  # the last step not measured: the prefill and the warm-up
    marks = {}
    for i, step in enumerate(steps):
        records = by_step[step]
        begin = clock.now
        stall_before = sum(loader._stalls.values())
        host_before = (host_exposed, host_busy, host_experts)
        scheduler.new_step()
        if roofline is None:
            prev_end = step_starts[step]
        by_layer = {r["layer_idx"]: r for r in records}
        # What was on the device, or on its way, when the token began: the bound's starting point.
        at_start = {key: loader.left(slot) for key, slot in cache.slot_of.items()}
        routed, misses = 0, []
        for layer_idx in range(num_layers):
            layer_start = clock.now
            scheduler.prefetch(layer_idx, said.get((step, layer_idx), []))
            record = by_layer.get(layer_idx)
            if roofline is not None:
                clock.now += roofline.dense(records[0]["tokens"])
            elif record is not None:
                clock.now += max(0.0, record["start"] - prev_end)  # attention and the rest, as measured
            if record is None:
                if cpu is not None:
                    clock.now = max(clock.now, layer_start + cpu.layer_s)
                continue
            scheduler.tick(clock.now)
            experts = list(record["experts"])
            routed += len(experts)
            misses += [at_start.get((layer_idx, e), 1.0) for e in experts if at_start.get((layer_idx, e), 1.0) > 0]
            # Tokens per expert are not recorded: the call's pairs spread evenly (1 in decode).
            per_expert = max(1, record["tokens"] * top_k // max(1, len(experts)))
            host, waves = scheduler.plan(layer_idx, experts, dict.fromkeys(experts, per_expert), placement)
            device_start = clock.now
            measured = None
            if roofline is None:
                # The call's own time without its stall and its host lane (both timed apart), shared
                # over the waves; all of it when no expert ran on the device (read, plan, bookkeeping).
                measured = record["end"] - record["start"] - record.get("wait_s", 0.0) - record.get("host_s", 0.0)
                measured = max(0.0, measured)
                if not waves:
                    clock.now += measured
            on_device = sum(len(wave) for wave in waves)
            for wave in waves:
                slots = scheduler.acquire(layer_idx, wave)
                if roofline is not None:
                    clock.now += roofline.moe(record["tokens"], len(wave), top_k)
                else:
                    clock.now += measured * len(wave) / on_device
                scheduler.release(slots.values())
            if host:
                # The host lane runs beside the device's compute: the layer ends when both have.
                # When the device is the host CPU itself, it runs after the device part instead.
                host_s = placement.costs.host_layer_s + sum(placement.host_s(per_expert) for _ in host)
                host_start = device_start if host_overlaps else clock.now
                host_exposed += max(0.0, host_start + host_s - clock.now)
                clock.now = max(clock.now, host_start + host_s)
                host_busy += host_s
                host_experts += len(host)
                scheduler.upload(layer_idx, host)
            if cpu is not None:
                # The CPU issues the layer and reads its routing: the layer ends no sooner.
                clock.now = max(clock.now, layer_start + cpu.layer_s + cpu.moe_layer_s)
            if roofline is None:
                prev_end = record["end"]
        if roofline is not None:
            clock.now += roofline.head_bytes / roofline.hbm_bandwidth
        elif i + 1 < len(steps) and steps[i + 1] < len(step_starts):
            clock.now += max(0.0, step_starts[steps[i + 1]] - prev_end)  # sampling, loop overhead
        if cpu is not None and roofline is not None:
            clock.now += cpu.token_s  # after the token is read back, before the next forward
        stall = sum(loader._stalls.values()) - stall_before
        work.append((routed, misses))
        tokens.append(
            {
                "step": step,
                "seconds": clock.now - begin,
                "stall_s": stall,
                "host_exposed_s": host_exposed - host_before[0],
                "host_s": host_busy - host_before[1],
                "host_experts": host_experts - host_before[2],
            }
        )
        if step in (steps[0], first_measured):
            marks[step] = (cache.totals(), host_experts)
    measured = [t for t in tokens if t["step"] > first_measured] or [t for t in tokens if t["step"] > steps[0]]
    cold = [t for t in tokens if steps[0] < t["step"] <= first_measured]
    if roofline is None and len(step_starts) <= steps[-1] + 1 and measured:
        measured = measured[:-1] or measured  # the last step has no measured end
    totals = cache.totals()
    after, host_after = marks.get(first_measured, marks[steps[0]])
    demand = totals.hits + totals.misses + host_experts  # every routed expert, wherever it ran
    decode_hits = totals.hits - after.hits
    decode_misses = totals.misses - after.misses
    decode_used = totals.prefetch_used - after.prefetch_used
    decode_issued = totals.prefetch_issued - after.prefetch_issued
    seconds = sum(t["seconds"] for t in measured)
    stall = sum(t["stall_s"] for t in measured)
    decode_host = host_experts - host_after
    routed_decode = decode_hits + decode_misses + decode_host
    bound = config = None
    if roofline is not None and lanes is not None:
        kept = {id(t) for t in measured}
        cpu_token = 0.0 if cpu is None else cpu.per_token(num_layers, len(moe_layer_ids))
        bound = three_lane_bound(
            [w for t, w in zip(tokens, work) if id(t) in kept], roofline, lanes, num_layers, cpu_token
        )
        window = {t["step"] for t in measured}
        accesses = [
            [(r["layer_idx"], e) for r in by_step[step] for e in r["experts"]] for step in steps if step in window
        ]
        config = config_bound(accesses, cache_slots, roofline, lanes, num_layers, cpu_token)
    n = len(measured)
    return {
        "on_miss": placement.on_miss if placement is not None else "wait",
        "policy": policy,
        "bound_tokens_per_s": bound,
        "config_bound_tokens_per_s": config,
        "warmup": warmup,
        "cold_start_tokens_per_s": len(cold) / sum(t["seconds"] for t in cold) if cold else None,
        "host_experts": sum(t["host_experts"] for t in tokens),
        "host_s_per_token": sum(t["host_s"] for t in measured) / n if n else 0.0,
        "host_exposed_s_per_token": sum(t["host_exposed_s"] for t in measured) / n if n else 0.0,
        "tokens": tokens,
        "decode_tokens": n,
        "tokens_per_s": n / seconds if seconds else 0.0,
        "median_token_s": statistics.median(t["seconds"] for t in measured) if measured else 0.0,
        "stall_share": stall / seconds if seconds else 0.0,
        "compute_s_per_token": (seconds - stall) / n if n else 0.0,
        "exposed_transfer_s_per_token": stall / n if n else 0.0,
        "cpu_bound_tokens_per_s": None if cpu is None else 1 / cpu.per_token(num_layers, len(moe_layer_ids)),
        "hit_rate": totals.hits / demand if demand else 0.0,
        # the measured decode tokens only (the prefill touches nearly every expert), with the bench's definitions
        "decode_hit_rate": decode_hits / routed_decode if routed_decode else 0.0,
        "decode_prefetch_precision": decode_used / decode_issued if decode_issued else 0.0,
        "decode_prefetch_recall": prefetch_recall(
            {"hits": decode_hits, "misses": decode_misses, "prefetch_used": decode_used, "host_experts": decode_host}
        )
        or 0.0,
        "prefetch_issued": totals.prefetch_issued,
        "prefetch_used": totals.prefetch_used,
        "bytes_loaded": totals.bytes_loaded,
    }


def _predictions(
    predictor: str, trace: list[dict], recorded: list[dict], moe_layer_ids: list[int], lookahead: int
) -> dict[tuple[int, int], list]:
    """(step, layer_idx) -> predictions issued at the start of that decoder layer."""
    if predictor == "none":
        return {}
    if predictor == "recorded":
        return {(p["step"], p["layer_idx"]): [tuple(x) for x in p["predictions"]] for p in recorded}
    routed = {(r["step"], r["layer_idx"]): list(r["experts"]) for r in trace}
    out: dict[tuple[int, int], list] = {}
    for step, layer_idx in sorted({(r["step"], layer) for r in trace for layer in range(max(moe_layer_ids) + 1)}):
        targets = [t for t in moe_layer_ids if t > layer_idx][:lookahead]
        source_step = step if predictor == "oracle" else step - 1
        said = [(t, d, routed[(source_step, t)]) for d, t in enumerate(targets, 1) if (source_step, t) in routed]
        if said:
            out[(step, layer_idx)] = said
    return out


def replay_payload(runtime) -> dict:
    """Everything `simulate` needs from a run, JSON-ready: goes into run.json as "replay"."""
    per_layer, head = dense_bytes(runtime.model, runtime.layers)
    return {
        "trace": list(runtime.trace),
        "predictions": [{**p, "predictions": [list(x) for x in p["predictions"]]} for p in runtime.predictions],
        "step_starts": list(runtime.step_starts),
        "expert_bytes": runtime.spec.nbytes,
        "expert_params": runtime.spec.numel,
        "itemsize": runtime.spec.dtype.itemsize,
        "moe_layer_ids": list(runtime.moe_layer_ids),
        "num_layers": int(runtime.model.config.num_hidden_layers),
        "top_k": max(layer.top_k for layer in runtime.layers),
        "cache_slots": runtime.cache.num_slots,
        "dense_bytes_per_layer": per_layer,
        "head_bytes": head,
        "lookahead": runtime.config.lookahead,
        "predictor": getattr(runtime.predictor, "name", "none"),
        # per layer with a KV cache: [bytes per token at 2 bytes a value, window or None]
        "kv_layers": [list(x) for x in kv_layers(runtime.model.config, 2)],
    }


def simulate_replay(
    replay: dict,
    profile,
    cache_slots: int | None = None,
    predictor: str = "recorded",
    itemsize: int = 2,
    on_miss: str = "wait",
    costs: LaneCosts | None = None,
    policy: str = "lru",
    experts: dict | None = None,
    cpu: CpuLane | None = None,
    warmup: int = 0,
    kv_bytes: int = 0,
) -> dict:
    """Simulate a recorded run (`replay_payload`) on a hardware profile with roofline compute,
    with weights at `itemsize` bytes per parameter (2: bf16, as on a GPU) whatever ran here.
    `on_miss` other than "wait" adds the host lane, at `costs` (default: the profile's device
    and link with the shipped desktop host, `profiles.default_lane_costs`). `experts`: compressed
    experts (`expert_traffic`): the bytes the link moves, and the bytes the host lane and the
    device touch per expert call (decoding included); None: plain experts at `itemsize`.
    `cpu`: the CPU lane (`CpuLane`; None: none, the device alone). `warmup`: decode tokens of
    cold start before the steady state is measured. `kv_bytes`: the KV cache each decode token's
    attention reads (`Anatomy.kv_bytes(context)`), spread over the layers."""
    scale = itemsize / replay.get("itemsize", itemsize)
    plain = replay["expert_params"] * itemsize
    experts = experts or {"bytes": plain, "host_bytes": plain, "device_bytes": plain}
    expert_bytes = experts["bytes"]
    lanes = _lanes(on_miss, costs, profile, experts, replay["expert_params"])
    roofline = Roofline(
        profile.hbm_bandwidth_bytes_per_s,
        profile.peak_bf16_flops,
        replay["dense_bytes_per_layer"] * scale,
        experts["device_bytes"],
        replay["expert_params"],
        replay["head_bytes"] * scale,
        kv_bytes / replay["num_layers"],
    )
    result = simulate(
        replay["trace"],
        cache_slots=cache_slots or replay["cache_slots"],
        expert_bytes=expert_bytes,
        bandwidth=profile.h2d_bandwidth_bytes_per_s,
        moe_layer_ids=replay["moe_layer_ids"],
        num_layers=replay["num_layers"],
        predictions=replay["predictions"],
        roofline=roofline,
        top_k=replay["top_k"],
        predictor=predictor,
        lookahead=replay["lookahead"],
        placement=lanes if on_miss != "wait" else None,
        lanes=lanes,
        policy=policy,
        cpu=cpu,
        warmup=warmup,
    )
    result.pop("tokens")
    return {
        "profile": profile.name,
        "cache_slots": cache_slots or replay["cache_slots"],
        "predictor": replay["predictor"] if predictor == "recorded" else predictor,
        "measured_on": "simulated",
        **result,
    }


def _lanes(on_miss: str, costs: LaneCosts | None, profile, experts: dict, expert_params: int) -> Placement:
    """The runtime's placement rule on the simulated machine's lanes (for "wait" too: the
    three-lane bound needs the host lane's speed whatever the replay's own placement)."""
    if costs is None:
        from ..runtime.profiles import default_lane_costs

        costs = default_lane_costs(profile)
    return Placement(costs, experts["bytes"], expert_params, on_miss, experts["host_bytes"], experts["device_bytes"])
