"""The runtime: one object per attached model, tying store, pool, cache, loader and predictor.

Per MoE layer call (`experts_forward`):
  router's top_k_index -> distinct experts -> cache.access (hit, or demand load ahead of
  every prefetch) -> wait on each slot's copy (the stall) -> expert ids remapped to slot ids
  -> the model's stock expert kernel on the slot tensors -> release the slots.
When a layer needs more distinct experts than there are slots (prefill), it runs in waves.
Per decoder layer start (`on_layer_start`): the predictor sees the residual stream and
names experts of layers l+1..l+D; those become prefetches ordered by when they are needed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from dataclasses import asdict

import torch

from .cache import ExpertCache, Key, SlotState
from .config import RuntimeConfig
from .layout import ExpertSpec, MoELayer
from .loader import DEMAND, Loader
from .pool import SlotPool
from .store import HostStore

logger = logging.getLogger(__name__)


class Runtime:
    """Holds the offloading state of one model. Build it with `moe_prefetch.load` or `attach`."""

    def __init__(self, *, model, layers: list[MoELayer], spec: ExpertSpec, store: HostStore, pool: SlotPool,
                 cache: ExpertCache, loader: Loader, config: RuntimeConfig, device: torch.device,
                 device_reason: str, kernel, restore):
        self.model = model
        self.layers = layers
        self.by_layer = {layer.layer_idx: layer for layer in layers}
        self.moe_layer_ids = [layer.layer_idx for layer in layers]
        self.spec = spec
        self.store = store
        self.pool = pool
        self.cache = cache
        self.loader = loader
        self.config = config
        self.device = device
        self.device_reason = device_reason
        self.kernel = kernel  # the stock experts forward, e.g. grouped_mm_experts_forward
        self._restore = restore  # undoes attach; set by integration
        self.predictor = None  # set by integration once the runtime exists
        self.step = -1
        self.trace: list[dict] = []  # one record per MoE layer call: the routing trace and its timings
        self._loading: dict[Key, int] = {}  # keys whose copies are queued or in flight
        self._expected: dict[int, set[int]] = {}  # latest predictions per target layer
        self._proxies: dict[int, object] = {}
        self._attached = True
        self._t0 = time.perf_counter()

    # -- hooks called from the model -------------------------------------------
    def on_layer_start(self, layer_idx: int, hidden: torch.Tensor) -> None:
        if layer_idx == 0:
            self.step += 1
            self._expected.clear()
        if self.predictor is None or self.predictor.name == "none":
            return
        self._reap()
        predictions = self.predictor.predict(layer_idx, hidden, self.step)
        for target, _, experts in predictions:
            self._expected[target] = set(experts)
        upcoming = [t for t in self.moe_layer_ids if t >= layer_idx][:2]
        protected = {(t, e) for t in upcoming for e in self._expected.get(t, ())}
        for target, distance, experts in sorted(predictions, key=lambda p: p[1]):
            for expert_id in experts:
                key = (target, expert_id)
                reserved = self.cache.prefetch(key, protected=protected)
                if reserved is None:
                    break  # nothing left to evict without hurting nearer layers
                slot, needs_load = reserved
                if needs_load:
                    self._load(key, slot, priority=float(distance))

    def experts_forward(self, layer: MoELayer, hidden_states, top_k_index, top_k_weights):
        start = time.perf_counter()
        layer_idx = layer.layer_idx
        before = asdict(self.cache.counters[layer_idx])
        self._reap()
        needed = sorted(int(e) for e in torch.unique(top_k_index).tolist() if 0 <= e < layer.num_experts)
        self._forget_stale(layer_idx, set(needed))
        if self.predictor is not None:
            self.predictor.observe(layer_idx, top_k_index, self.step)
        # Experts already resident go first, so a wave never evicts one it is about to use.
        needed.sort(key=lambda e: self.cache.lookup((layer_idx, e)) is None)
        waves = [needed[i : i + self.cache.num_slots] for i in range(0, len(needed), self.cache.num_slots)]
        out = None
        for wave in waves:
            part = self._run_wave(layer, wave, hidden_states, top_k_index, top_k_weights, single=len(waves) == 1)
            out = part if out is None else out + part
        if out is None:  # no token routed to a local expert
            out = torch.zeros_like(hidden_states)
        self.cache.add_stall(layer_idx, 0.0)
        after = asdict(self.cache.counters[layer_idx])
        self.trace.append({
            "step": self.step, "layer_idx": layer_idx, "tokens": int(hidden_states.shape[0]), "experts": needed,
            "waves": len(waves), "start": start - self._t0, "end": time.perf_counter() - self._t0,
            **{k: after[k] - before[k] for k in ("hits", "misses", "prefetch_used", "bytes_loaded")},
        })
        return out

    # -- internals ---------------------------------------------------------------
    def _run_wave(self, layer, wave, hidden_states, top_k_index, top_k_weights, single):
        layer_idx = layer.layer_idx
        slots = {e: self._acquire((layer_idx, e)) for e in wave}
        try:
            for slot in slots.values():
                self.loader.wait(slot, layer_idx)
            for e, slot in slots.items():
                self._loading.pop((layer_idx, e), None)
                self.cache.mark_ready(slot)
            if self.config.verify_slots:
                self.verify(layer_idx, wave)
            lut = torch.full((layer.num_experts + 1,), -1, dtype=torch.long)
            for e, slot in slots.items():
                lut[e] = slot
            lut = lut.to(top_k_index.device, non_blocking=True)
            index = top_k_index.clamp(0, layer.num_experts)  # sentinels (EP) map to the -1 row
            slot_index = lut[index]
            proxy = self._proxy(layer)
            if single:
                return self.kernel(proxy, hidden_states, slot_index, top_k_weights)
            # A wave covers only some pairs: other pairs point at a wave slot with weight 0,
            # and only tokens with at least one pair in this wave are computed.
            in_wave = slot_index >= 0
            rows = in_wave.any(dim=-1).nonzero().squeeze(-1)
            filler = next(iter(slots.values()))
            sub_index = torch.where(in_wave[rows], slot_index[rows], filler)
            sub_weights = torch.where(in_wave[rows], top_k_weights[rows], torch.zeros_like(top_k_weights[rows]))
            part = self.kernel(proxy, hidden_states[rows], sub_index, sub_weights)
            out = torch.zeros_like(hidden_states)
            return out.index_add_(0, rows, part.to(out.dtype))
        finally:
            for slot in slots.values():
                self.loader.release(slot)
                self.cache.unpin(slot)

    def _acquire(self, key: Key) -> int:
        """Pin `key` in a slot for the running layer, issuing a demand load if it is absent."""
        try:
            slot, needs_load = self.cache.access(key)
        except Exception:
            # Every unpinned slot is in flight: let those copies land, then they can be evicted.
            for loading_key, slot in list(self._loading.items()):
                self.loader.wait(slot, key[0])
                self.cache.mark_ready(slot)
                del self._loading[loading_key]
            slot, needs_load = self.cache.access(key)
        if needs_load:
            self._load(key, slot, priority=DEMAND)
        return slot

    def _load(self, key: Key, slot: int, priority: float) -> None:
        self._loading[key] = slot
        self.loader.submit(slot, self.store[key], self.pool.slot(slot), priority, tag=key)

    def _reap(self) -> None:
        for key, slot in list(self._loading.items()):
            if self.loader.done(slot):
                self.cache.mark_ready(slot)
                del self._loading[key]

    def _forget_stale(self, layer_idx: int, needed: set[int]) -> None:
        """Drop queued prefetches this layer turned out not to need (or for layers already
        passed), and demote resident predictions that were wrong: they are evicted first."""
        for key, slot in list(self._loading.items()):
            stale = key[0] < layer_idx or (key[0] == layer_idx and key[1] not in needed)
            if stale and key in self.cache.unused_prefetch and self.loader.cancel(slot):
                del self._loading[key]
                self.cache.drop(key)
        for key in list(self.cache.unused_prefetch):
            if key[0] == layer_idx and key[1] not in needed:
                self.cache.demote(key)

    def _proxy(self, layer: MoELayer):
        """A stand-in for the experts module whose weights are the slot tensors."""
        proxy = self._proxies.get(layer.layer_idx)
        if proxy is None:
            module = layer.experts
            proxy = object.__new__(type(module))
            proxy.__dict__.update(module.__dict__)
            proxy.__dict__["_parameters"] = {}
            proxy.__dict__.update(self.pool.params)
            proxy.__dict__["num_experts"] = self.pool.num_slots
            self._proxies[layer.layer_idx] = proxy
        return proxy

    # -- public API ----------------------------------------------------------------
    def verify(self, layer_idx: int | None = None, experts=None) -> None:
        """Debug check: every READY slot (or those of `experts` in `layer_idx`) holds exactly
        the bytes of the expert the cache says it holds."""
        for slot, key in enumerate(self.cache.key_of):
            if key is None or self.cache.state[slot] is not SlotState.READY:
                continue
            if layer_idx is not None and (key[0] != layer_idx or key[1] not in experts):
                continue
            if not torch.equal(self.pool.slot(slot).cpu(), self.store[key]):
                raise AssertionError(f"slot {slot} does not hold layer {key[0]} expert {key[1]}")

    def stats(self) -> dict:
        """Counters since attach (or the last `reset_stats`): totals and `per_layer`."""
        for layer_idx, seconds in self.loader.take_stalls().items():
            self.cache.add_stall(layer_idx, seconds)
        totals = asdict(self.cache.totals())
        demand = totals["hits"] + totals["misses"]
        issued = totals["prefetch_issued"]
        return {
            **totals,
            "hit_rate": totals["hits"] / demand if demand else 0.0,
            "prefetch_precision": totals["prefetch_used"] / issued if issued else 0.0,
            "per_layer": [{"layer_idx": l, **asdict(c)} for l, c in sorted(self.cache.counters.items())],
            "cache_slots": self.cache.num_slots,
            "expert_bytes": self.spec.nbytes,
            "num_experts": sum(layer.num_experts for layer in self.layers),
            "moe_layers": len(self.layers),
            "device": str(self.device),
            "device_reason": self.device_reason,
            "loader": self.loader.kind,
            "loader_reason": self.loader.reason,
            "host_memory": "pinned" if self.store.pinned else "pageable",
            "host_memory_reason": self.store.pin_reason,
            "predictor": getattr(self.predictor, "name", "none"),
            "lookahead": self.config.lookahead,
            "stall_timing": "cuda-events" if self.loader.kind == "cuda-stream" else "cpu-wait",
        }

    def reset_stats(self) -> None:
        self.loader.take_stalls()
        self.cache.reset_counters()
        self.trace.clear()
        self.step = -1

    def routing_counts(self) -> dict[int, Tally]:
        counts: dict[int, Tally] = {}
        for record in self.trace:
            counts.setdefault(record["layer_idx"], Tally()).update(record["experts"])
        return counts

    def detach(self):
        """Put the model back exactly as it was: experts in place, stock implementation.
        Releases the slots, the loader thread or stream, and the host store."""
        if not self._attached:
            return self.model
        self.loader.close()
        self._restore()
        self._proxies.clear()
        self.pool = None
        self.store.close()
        self._attached = False
        return self.model

    @property
    def attached(self) -> bool:
        return self._attached
