"""Where each routed expert ran, and the time on each lane, from a run's records (no torch).

Routed experts, split four ways from the cache's counters (`ran`):
  device    a hit on an expert that was already resident        hits - prefetch_used
  uploaded  a hit on an expert a prefetch or upload brought in  prefetch_used
  waited    a miss that waited for its demand load              misses
  host      computed on the host lane from the host store       host_experts

Lanes, in seconds per token and per MoE layer (`lanes`):
  device_s   the device's compute
  host_s     the host lane (the runtime times its host part with the host clock)
  link_s     host-to-device copies
  exposed_s  what the lanes added to the critical path: the stall, plus host time the device's
             own work did not hide
How each is measured depends on where the run was measured; `basis` says it in words, and the
run keeps the sentence beside the numbers (run.json "lane_basis").

Per layer, a run reports its lanes over decode tokens only (`layer_decode`): step 0 holds the
prefill and every one-off cost of the first forward (the kernels' first calls, thread pools
waking), which would otherwise land in whichever layer ran first.

Prefetch recall (`prefetch_recall`), from the same split: of the routed experts that were not
already on the device (uploaded, waited, host), the share a prefetch or upload had staged. It is
not a predictor's recall@k (`evaluate.py`: the share of the router's top-k a predictor named,
offline on held-out text): a right guess that landed too late, or evicted before its layer ran,
counts here as a miss.
"""

from __future__ import annotations

LANES = ("device_s", "host_s", "link_s", "exposed_s")
RAN = ("device", "uploaded", "waited", "host")


def ran(counters: dict) -> dict:
    """Where the routed experts counted in `counters` (one token, one layer or a total) ran."""
    used = counters.get("prefetch_used", 0)
    return {
        "device": counters.get("hits", 0) - used,
        "uploaded": used,
        "waited": counters.get("misses", 0),
        "host": counters.get("host_experts", 0),
    }


def prefetch_recall(counters: dict) -> float | None:
    """Of the routed experts in `counters` that were not already resident, the share a prefetch or
    upload had brought in before their layer ran (None when every routed expert was resident)."""
    r = ran(counters)
    staged_or_not = r["uploaded"] + r["waited"] + r["host"]
    return r["uploaded"] / staged_or_not if staged_or_not else None


def basis(measured_on: str, link_bytes_per_s: float | None) -> dict:
    """How each lane's seconds were obtained: one sentence per lane, and a short `summary`."""
    if measured_on == "cpu":
        return {
            "summary": "cpu clock; link = the loader thread's copy times; exposed = stall + host lane",
            "device_s": "cpu clock: per token, wall time minus stall minus host lane (one thread runs both lanes, "
            "so this holds every other layer, sampling and Python overhead too); per layer, the MoE calls' own "
            "time without their stall and host lane",
            "host_s": "cpu clock around the runtime's host part",
            "link_s": "the loader thread's copy durations (start to end, paced if link_bandwidth is set), "
            "clipped to the token's time",
            "exposed_s": "stall + host lane: on a CPU device the host lane runs after the device part, not beside it",
        }
    link = "an unknown link speed" if not link_bytes_per_s else f"{link_bytes_per_s / 1e9:.3g} GB/s"
    return {
        "summary": "stall from CUDA events, host lane from the host clock, link = bytes / link speed; "
        "exposed is an upper bound and device a lower bound",
        "device_s": "per token, wall time minus exposed time: a lower bound (the device's own work is not timed, "
        "no events are recorded for it); per layer, not timed",
        "host_s": "host clock around the runtime's host part",
        "link_s": f"bytes loaded over the placement's link speed ({link}): copies are not timed one by one",
        "exposed_s": "stall (CUDA events on the compute stream) + host lane in full: an upper bound, since the "
        "device computes the resident experts while the host lane runs",
    }


class _Copies:
    """Copies with start/end on the trace clock, clipped to successive windows of time. Sorted
    by end: each window looks only at copies that can reach into it, so a run costs about its
    number of copies, not tokens x copies."""

    def __init__(self, events: list[dict]):
        self.events = sorted((e for e in events if "start" in e and "end" in e), key=lambda e: e["end"])
        self.longest = max((e["end"] - e["start"] for e in self.events), default=0.0)
        self.first = 0

    def seconds(self, lo: float, hi: float, layer_idx: int | None = None) -> float:
        """Copy seconds within [lo, hi] (of copies for `layer_idx` only, if given). Windows must
        come in order of time."""
        events = self.events
        while self.first < len(events) and events[self.first]["end"] <= lo:
            self.first += 1
        total, j = 0.0, self.first
        while j < len(events) and events[j]["end"] - self.longest < hi:
            e = events[j]
            j += 1
            if layer_idx is not None and not (e.get("tag") and e["tag"][0] == layer_idx):
                continue
            total += max(0.0, min(e["end"], hi) - max(e["start"], lo))
        return total


def token_lanes(
    tokens: list[dict],
    trace: list[dict],
    loads: list[dict],
    *,
    measured_on: str,
    clock_start: float,
    link_bytes_per_s: float | None,
) -> None:
    """Add `ran` and `lanes` to each token record and to each of its `per_layer` entries, in place.

    Token i is the runtime's step i (its forward); it covers the trace clock from the previous
    token's arrival (or `clock_start`, the trace-clock time of `RunRecorder.start`) to its own,
    which is the window its copies are clipped to."""
    timed = measured_on == "cpu"  # only the CPU loader thread times its copies
    copies = _Copies(loads if timed else [])
    calls: dict[tuple[int, int], list[dict]] = {}
    for record in trace:
        calls.setdefault((record["step"], record["layer_idx"]), []).append(record)
    end = clock_start
    for token in tokens:
        begin, end = end, clock_start + token["t"]
        stall, host = token["stall_seconds"], token["host_seconds"]
        token["ran"] = ran(token)
        token["lanes"] = {
            "device_s": max(0.0, token["wall_s"] - stall - host),
            "host_s": host,
            "link_s": copies.seconds(begin, end) if timed else _link(token["bytes_loaded"], link_bytes_per_s),
            "exposed_s": stall + host,
        }
        for layer in token.get("per_layer", []):
            idx = layer["layer_idx"]
            own = calls.get((token["step"], idx), [])
            layer["ran"] = ran(layer)
            layer["lanes"] = {
                "device_s": sum(_device_part(r) for r in own) if timed else None,
                "host_s": layer["host_seconds"],
                "link_s": copies.seconds(begin, end, idx) if timed else _link(layer["bytes_loaded"], link_bytes_per_s),
                "exposed_s": layer["stall_seconds"] + layer["host_seconds"],
            }


def layer_totals(tokens: list[dict], layer_idx: int) -> dict | None:
    """One layer's lanes summed over `tokens` (None without tokens with lanes; a lane None where
    it is not timed per layer)."""
    rows = [p["lanes"] for t in tokens for p in t.get("per_layer", []) if p["layer_idx"] == layer_idx and "lanes" in p]
    if not rows:
        return None
    return {k: None if any(r[k] is None for r in rows) else sum(r[k] for r in rows) for k in LANES}


def layer_decode(tokens: list[dict], layer_idx: int) -> dict:
    """One layer over the decode tokens (every token after the first): where its routed experts
    ran (`decode_ran`) and its seconds per lane (`decode_lanes`), for run.json's "layers"."""
    decode = tokens[1:]
    own = [p for t in decode for p in t.get("per_layer", []) if p["layer_idx"] == layer_idx]
    return {"decode_ran": total_ran(own), "decode_lanes": layer_totals(decode, layer_idx)}


def mean_lanes(tokens: list[dict]) -> dict | None:
    """Each lane's mean seconds over `tokens` (None without tokens with lanes; a lane None
    where it was not obtained)."""
    rows = [t["lanes"] for t in tokens if "lanes" in t]
    if not rows:
        return None
    return {k: None if any(r[k] is None for r in rows) else sum(r[k] for r in rows) / len(rows) for k in LANES}


def total_ran(records: list[dict]) -> dict:
    """Where the routed experts of `records` (tokens or per-layer entries) ran, summed; from their
    counters, so runs recorded before tokens carried "ran" give the same split."""
    totals = dict.fromkeys(RAN, 0)
    for record in records:
        for k, v in ran(record).items():
            totals[k] += v
    return totals


def _device_part(record: dict) -> float:
    """A MoE call's own time without its stall and its host lane (expert kernels and scheduling)."""
    return max(0.0, record["end"] - record["start"] - record.get("wait_s", 0.0) - record.get("host_s", 0.0))


def _link(nbytes: float, link_bytes_per_s: float | None) -> float | None:
    return nbytes / link_bytes_per_s if link_bytes_per_s else None
