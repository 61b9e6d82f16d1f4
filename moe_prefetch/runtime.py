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
from dataclasses import asdict

import torch

from .cache import ExpertCache, SlotState
from .config import RuntimeConfig
from .layout import ExpertSpec, MoELayer
from .loader import Loader
from .pool import SlotPool
from .scheduler import Scheduler
from .store import HostStore

logger = logging.getLogger(__name__)


class Runtime:
    """Holds the offloading state of one model. Build it with `moe_prefetch.load` or `attach`."""

    def __init__(
        self,
        *,
        model,
        layers: list[MoELayer],
        spec: ExpertSpec,
        store: HostStore,
        pool: SlotPool,
        cache: ExpertCache,
        loader: Loader,
        config: RuntimeConfig,
        device: torch.device,
        device_reason: str,
        kernel,
        restore,
        t0: float | None = None,
    ):
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
        self.scheduler = Scheduler(
            cache,
            loader,
            lambda key, slot: (store[key], pool.slot(slot)),
            self.moe_layer_ids,
            top_k=max(layer.top_k for layer in layers),
        )
        self.predictions: list[dict] = []  # what the predictor said, for replay by the simulator
        self.step_starts: list[float] = []  # when each forward call entered layer 0 (seconds since attach)
        self._luts: dict[int, tuple] = {}  # layer -> (cache version, proxy, expert -> slot - lo)
        self._call_wait = 0.0
        self._predicting = False
        self._wide_waves = getattr(kernel, "__name__", "") == "grouped_mm_experts_forward"
        self._attached = True
        self._t0 = time.perf_counter() if t0 is None else t0

    # -- hooks called from the model -------------------------------------------
    def on_layer_start(self, layer_idx: int, hidden: torch.Tensor) -> None:
        if layer_idx == 0:
            self.step += 1
            self.step_starts.append(time.perf_counter() - self._t0)
            self.scheduler.new_step()
        if self.predictor is None or self.predictor.name == "none" or self.predictor.source != "residual":
            return
        self._predict(layer_idx, hidden)

    def on_router_input(self, layer_idx: int, normed: torch.Tensor) -> None:
        """Prediction point of "router-input" predictors: MoE layer `layer_idx`'s router input."""
        if not self._predicting:  # predictors call routers themselves: ignore those calls
            self._predict(layer_idx, normed)

    def _predict(self, layer_idx: int, hidden: torch.Tensor) -> None:
        self._predicting = True
        try:
            predictions = self.predictor.predict(layer_idx, hidden, self.step)
        finally:
            self._predicting = False
        if predictions:
            self.predictions.append({"step": self.step, "layer_idx": layer_idx, "predictions": predictions})
        self.scheduler.prefetch(layer_idx, predictions)

    def experts_forward(self, layer: MoELayer, hidden_states, top_k_index, top_k_weights):
        start = time.perf_counter()
        layer_idx = layer.layer_idx
        counters = self.cache.counters[layer_idx]
        before = (counters.hits, counters.misses, counters.prefetch_used, counters.bytes_loaded)
        self._call_wait = 0.0
        needed = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < layer.num_experts]
        waves = self.scheduler.plan(layer_idx, needed) if needed else []
        if self.predictor is not None:
            self.predictor.observe(layer_idx, top_k_index, self.step)
        single = len(waves) == 1
        out = None
        for wave in waves:
            part = self._run_wave(layer, wave, hidden_states, top_k_index, top_k_weights, single=single)
            out = part if out is None else out + part
        if out is None:  # no token routed to a local expert
            out = torch.zeros_like(hidden_states)
        out = out.to(hidden_states.dtype)
        self.trace.append(
            {
                "step": self.step,
                "layer_idx": layer_idx,
                "tokens": int(hidden_states.shape[0]),
                "experts": needed,
                "waves": len(waves),
                "wait_s": self._call_wait,  # host time blocked on copies (the stall, on CPU)
                "start": start - self._t0,
                "end": time.perf_counter() - self._t0,
                "hits": counters.hits - before[0],
                "misses": counters.misses - before[1],
                "prefetch_used": counters.prefetch_used - before[2],
                "bytes_loaded": counters.bytes_loaded - before[3],
            }
        )
        return out

    # -- internals ---------------------------------------------------------------
    def _run_wave(self, layer, wave, hidden_states, top_k_index, top_k_weights, single):
        waited = time.perf_counter()
        slots = self.scheduler.acquire(layer.layer_idx, wave)
        self._call_wait += time.perf_counter() - waited
        try:
            if self.config.verify_slots:
                self.verify()  # debug: every ready slot, not only this wave's
            if single:
                proxy, lut = self._resident_view(layer, top_k_index.device)
                return self.kernel(proxy, hidden_states, lut[top_k_index], top_k_weights)
            lo, hi = min(slots.values()), max(slots.values()) + 1
            proxy = self._proxy(layer, lo, hi)
            # expert id -> slot id - lo for this wave only; every other expert (and the
            # expert-parallel sentinel row) maps to -1
            lut = torch.full((layer.num_experts + 1,), -1, dtype=torch.long)
            lut[list(slots)] = torch.tensor(list(slots.values()), dtype=torch.long) - lo
            slot_index = lut.to(top_k_index.device)[top_k_index.clamp(0, layer.num_experts)]
            # A wave covers only some pairs: other pairs point at a wave slot with weight 0,
            # and only tokens with at least one pair in this wave are computed.
            in_wave = slot_index >= 0
            rows = in_wave.any(dim=-1).nonzero().squeeze(-1)
            filler = next(iter(slots.values())) - lo
            sub_index = torch.where(in_wave[rows], slot_index[rows], filler)
            sub_weights = torch.where(in_wave[rows], top_k_weights[rows], torch.zeros_like(top_k_weights[rows]))
            sub_hidden = hidden_states[rows]
            if self._wide_waves:
                # grouped_mm casts its input to the weights' dtype for the matmuls and returns the
                # input's dtype: fp32 in means the per-token sum over top_k comes back unrounded,
                # so summing waves and rounding once matches the stock single pass in bf16 too.
                sub_hidden = sub_hidden.float()
            part = self.kernel(proxy, sub_hidden, sub_index, sub_weights)
            out = torch.zeros((hidden_states.shape[0], part.shape[-1]), dtype=part.dtype, device=part.device)
            return out.index_add_(0, rows, part)
        finally:
            self.scheduler.release(slots.values())

    def _resident_view(self, layer: MoELayer, device: torch.device):
        """(proxy, lut) for the span of slots holding `layer`'s resident experts: the proxy's
        weights are slots lo..hi-1 and lut maps expert id -> slot id - lo (-1 if absent; the
        extra last row is transformers' expert-parallel sentinel). The kernel sees only that
        span because kernels such as grouped_mm cost per group. Rebuilt only when the cache's
        contents change, so a decode step whose experts are all resident builds nothing."""
        cached = self._luts.get(layer.layer_idx)
        if cached is not None and cached[0] == self.cache.version:
            return cached[1], cached[2]
        slot_of = self.cache.slot_of
        table = [slot_of.get((layer.layer_idx, e), -1) for e in range(layer.num_experts)]
        held = [s for s in table if s >= 0]
        lo, hi = min(held), max(held) + 1
        lut = torch.tensor([s - lo if s >= 0 else -1 for s in table] + [-1], dtype=torch.long).to(device)
        proxy = self._proxy(layer, lo, hi)
        self._luts[layer.layer_idx] = (self.cache.version, proxy, lut)
        return proxy, lut

    def _proxy(self, layer: MoELayer, lo: int, hi: int):
        """A stand-in for the experts module whose weights are slots lo..hi-1 of the pool."""
        module = layer.experts
        proxy = object.__new__(type(module))
        proxy.__dict__.update(module.__dict__)
        proxy.__dict__["_parameters"] = {}
        for name, param in self.pool.params.items():
            proxy.__dict__[name] = param[lo:hi]
        proxy.__dict__["num_experts"] = hi - lo
        return proxy

    # -- public API ----------------------------------------------------------------
    def verify(self) -> None:
        """Debug check: every READY slot holds exactly the bytes of the expert the cache says
        it holds. Raises AssertionError naming the first slot that does not."""
        for slot, key in enumerate(self.cache.key_of):
            if key is None or self.cache.state[slot] is not SlotState.READY:
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
        self.predictions.clear()
        self.step_starts.clear()
        self.step = -1

    def detach(self):
        """Put the model back exactly as it was: experts in place, stock implementation.
        Releases the slots, the loader thread or stream, and the host store."""
        if not self._attached:
            return self.model
        self.loader.close()
        self._restore()
        self._luts.clear()
        self.pool = None
        self.store.close()
        self._attached = False
        return self.model

    @property
    def attached(self) -> bool:
        return self._attached
