"""The runtime: one object per attached model, tying store, pool, cache, loader and predictor.

Per MoE layer call (`experts_forward`):
  one device->host read: the router's top_k_index, together with the expert ids the predictor
  named since the last read -> those predictions become prefetches -> distinct experts ->
  cache.access (hit, or demand load ahead of every prefetch) -> wait on each slot's copy (the
  stall) -> expert ids remapped to slot ids -> the model's stock expert kernel on the slot
  tensors -> release the slots. When every routed expert is resident and landed (most decode
  calls once the cache is warm), `Scheduler.hit_all` does that bookkeeping in one pass, without
  plan, pins or per-slot releases: the fast path, with the same decisions and counters.
The kernel sees at most the layer's own number of experts: the span of pool slots holding the
routed experts when it is that tight (no copy), otherwise the routed experts gathered into a
small working buffer (`SlotPool.work`). Kernels such as grouped_mm cost per group, so a span
over thousands of scattered slots would cost more than the gather.
When a layer needs more distinct experts than there are slots (prefill), it runs in waves.
Compressed experts (`compression.Codec`) are always gathered: their slots hold stored bytes,
which the codec decodes into the working buffer in the model's dtype before the kernel.
Predictors run at each layer's router input (or decoder input) and return their guesses as
device tensors; the runtime reads them with the next routing, so prediction adds no
synchronisation of its own.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import asdict

import numpy as np
import torch

from ..errors import AttachedModelError
from ..experts import host_kernels as kernels
from ..experts.compression import release_scratch
from ..experts.layout import ExpertSpec, MoELayer
from . import lanes
from .cache import ExpertCache, SlotState
from .config import RuntimeConfig
from .host_lane import HostLane
from .loader import Loader
from .placement import DEFAULT_COSTS, LaneCosts, Placement
from .pool import SlotPool
from .prediction import Guess, settle
from .scheduler import Scheduler
from .store import HostStore

logger = logging.getLogger(__name__)

HOST_READ_TOKENS = 16  # calls up to this many tokens read their hidden states with the routing


# On a CPU device both lanes are the same cores: the host lane saves only the copy into a slot,
# and a layer that also has resident experts then runs the stock kernel twice. That kernel's fixed
# cost (sort, histogram, two grouped matmuls) was ~0.18 ms on one core of the workplace machine
# (8 experts, one token); on the demo, auto without it ran 76 tok/s against wait's 99
# (docs/benchmarks.md, 5c).
CPU_SPLIT_CALL_S = 150e-6


def default_costs(device: torch.device) -> LaneCosts:
    """Lane speeds when no profile says otherwise. On a CPU device the "device" is the host
    itself and an upload is a memory copy: a miss runs in place on the host lane when that saves
    more copying than splitting the layer costs (large experts, or many misses in one call), and
    is copied otherwise. A use on the device saves no host time there, so uploads are not
    investments (scheduler.py)."""
    if device.type == "cpu":
        c = DEFAULT_COSTS
        return LaneCosts(
            c.host_bytes_per_s / 2,
            c.host_bytes_per_s,
            c.host_flops,
            0.0,
            c.host_bytes_per_s,
            c.host_flops,
            split_call_s=CPU_SPLIT_CALL_S,
        )
    return DEFAULT_COSTS


def _history(record: bool, keep: int):
    return [] if record else collections.deque(maxlen=keep)


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
        costs: LaneCosts | None = None,
    ):
        self.model = model
        self.layers = layers
        self.by_layer = {layer.layer_idx: layer for layer in layers}
        self.moe_layer_ids = [layer.layer_idx for layer in layers]
        self.spec = spec
        self.codec = store.codec  # how experts are stored, moved and decoded
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
        self.recording = bool(config.record)
        self.history = config.history
        # Bounded unless recording: a long-lived process must not grow with every token.
        self.trace = _history(self.recording, self.history)  # one record per MoE layer call
        self.predictions = _history(self.recording, self.history)  # what the predictor said
        self.step_starts = _history(self.recording, self.history)  # when each forward entered layer 0
        self.step_stalls: dict[int, float] = {}  # stall seconds per step (the latest `history` steps)
        loader.record(self.recording, self.history)
        self.scheduler = Scheduler(
            cache, loader, self._source, self.moe_layer_ids, top_k=max(layer.top_k for layer in layers)
        )
        # How the kernel saw its experts: a span of slots or gathered into the working buffer;
        # the host lane counts its own passes and kernel calls (`host_lane.py`).
        self.kernel_calls = {"span": 0, "gathered": 0}
        self.host_lane = HostLane(store, self.codec, layers)
        # The host lane reads the stored bytes where a kernel reads them as stored (bf16 as is,
        # packed int8 and int4, each at its cost per byte); anything else is decoded first.
        host_bytes = max(kernels.host_bytes(self.codec, layer.experts) for layer in layers)
        # On a CPU device the device lane decodes compressed experts on the CPU too (issue 19:
        # int4 experts were uploaded there as investments, then decoded on every use).
        device_bytes = self.codec.host_bytes if device.type == "cpu" else self.codec.device_bytes
        self.placement = Placement(
            costs or default_costs(device),
            self.codec.nbytes,
            spec.numel,
            config.on_miss,
            host_bytes,
            device_bytes=device_bytes,
        )
        self.scheduler.placement = self.placement
        self._pending: list[tuple[int, list[Guess]]] = []  # guesses not yet read: (origin layer, guesses)
        self._tables: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (version, expert -> slot on device)
        self._spans: dict[int, tuple[int, int, object]] = {}  # layer -> (lo, hi, proxy): latest span view
        self._work_proxies: dict[tuple[int, int], object] = {}  # (layer, width) -> proxy on the working buffer
        self._shifted: dict[int, tuple[int, int, torch.Tensor]] = {}  # layer -> (version, lo, table - lo)
        self._call_wait = self._call_host = 0.0  # this layer call's stall and host-lane seconds
        # Layer calls whose routed experts were all resident and landed take `Scheduler.hit_all`:
        # the same bookkeeping without planning, pins or per-slot releases. Off: the general path
        # for every call (for comparisons; the results are the same).
        self.fast_path = True
        self.fast_path_calls = 0
        self.use_kernel(kernel)
        self._attached = True
        self._cuda = device.type == "cuda"
        self._t0 = time.perf_counter() if t0 is None else t0

    def use_kernel(self, kernel) -> None:
        """Run `kernel` (a stock experts function) on the slots from now on: generate() decodes
        with batched_mm on CUDA and switches back to grouped_mm after (guards.py)."""
        self.kernel = kernel
        self._wide_waves = getattr(kernel, "__name__", "") == "grouped_mm_experts_forward"

    @property
    def t0(self) -> float:
        """The `time.perf_counter()` value the trace's clock counts from (trace records,
        `step_starts` and the loader's copy events)."""
        return self._t0

    def _source(self, key, slot):
        return self.store[key], self.pool.slot(slot)

    def record(self, on: bool = True) -> None:
        """Keep every trace record, prediction and copy (for reports, bench and simulate), or
        (off) only the latest `config.history` of each, the default for long-lived processes."""
        self.recording = on
        for name in ("trace", "predictions", "step_starts"):
            old = getattr(self, name)
            setattr(self, name, list(old) if on else collections.deque(old, maxlen=self.history))
        self.loader.record(on, self.history)

    # -- hooks called from the model -------------------------------------------
    def _refuse_graph_capture(self) -> None:
        """A CUDA graph records kernels, not the runtime's host work (routing read, cache,
        copies): a replay would run the captured token's slots forever, whatever the cache
        holds by then. Refused at the first hook of a captured forward, before any state moves."""
        if self._cuda and torch.cuda.is_current_stream_capturing():
            raise AttachedModelError(
                "a CUDA graph is being captured through the moe-prefetch runtime, whose routing, slot table "
                "and copies are host work a graph cannot replay; run the attached model eagerly, or "
                "runtime.detach() before capturing"
            )

    def on_layer_start(self, layer_idx: int, hidden: torch.Tensor) -> None:
        self._refuse_graph_capture()
        if layer_idx == 0:
            self.step += 1
            self.loader.step = self.step
            self.step_starts.append(time.perf_counter() - self._t0)
            self.scheduler.new_step()
            self._pending.clear()
            self._drain_stalls()
        if self.predictor is None or self.predictor.name == "none" or self.predictor.source != "residual":
            return
        self._predict(layer_idx, hidden)

    def on_router_input(self, layer_idx: int, normed: torch.Tensor) -> None:
        """Prediction point of "router-input" predictors: MoE layer `layer_idx`'s router input."""
        # Predictors call routers without module hooks (predictors.silent), so this hook sees the
        # model's own router call only.
        self._refuse_graph_capture()
        self._predict(layer_idx, normed)

    def _predict(self, layer_idx: int, hidden: torch.Tensor) -> None:
        guesses = self.predictor.predict(layer_idx, hidden, self.step)
        if guesses:
            self._pending.append((layer_idx, guesses))

    def experts_forward(self, layer: MoELayer, hidden_states, top_k_index, top_k_weights):
        self._refuse_graph_capture()
        start = time.perf_counter()
        layer_idx = layer.layer_idx
        counters = self.cache.counters[layer_idx]
        before = (counters.hits, counters.misses, counters.prefetch_used, counters.bytes_loaded)
        self._call_wait = self._call_host = 0.0
        self.scheduler.tick(start)
        # Decode-sized calls bring their hidden states and routing weights along in the one
        # read, in case an expert runs on the host; prefill calls read them only if one does.
        small = self.placement.on_miss != "wait" and hidden_states.shape[0] <= HOST_READ_TOKENS
        routing, host_inputs = self._read(top_k_index, (hidden_states, top_k_weights) if small else ())
        # The routed experts, in plain Python: at decode sizes it is several times faster than
        # numpy's unique.
        num = layer.num_experts
        ids = routing.ravel().tolist()
        needed = sorted({e for e in ids if 0 <= e < num})
        # Every routed expert resident and landed: the fast path, no placement, pins or waves.
        slots = self.scheduler.hit_all(layer_idx, needed) if self.fast_path and needed else None
        if slots is not None:
            host, waves = [], [needed]
        else:
            # Pairs per routed expert (a token picks an expert once: its token count), for placement.
            tokens_on = collections.Counter(e for e in ids if 0 <= e < num)
            host, waves = self.scheduler.plan(layer_idx, needed, tokens_on, self.placement)
        if self.predictor is not None:
            self.predictor.observe(layer_idx, routing, self.step)
        out = None
        if slots is not None:
            self.fast_path_calls += 1
            try:
                out = self._on_slots(layer, needed, slots, routing, hidden_states, top_k_index, top_k_weights, True)
            finally:
                self.loader.release_all(slots)
        else:
            alone = len(waves) == 1 and not host
            for wave in waves:  # device work first: on CUDA it runs while the host computes below
                part = self._run_wave(layer, wave, routing, hidden_states, top_k_index, top_k_weights, alone=alone)
                out = part if out is None else out + part
        if host:
            out = self._host_part(layer, host, routing, hidden_states, top_k_weights, host_inputs, out)
            self.scheduler.upload(layer_idx, host)
        if out is None:  # no token routed to a local expert
            out = torch.zeros_like(hidden_states)
        if out.dtype != hidden_states.dtype:
            out = out.to(hidden_states.dtype)
        self.trace.append(
            {
                "step": self.step,
                "layer_idx": layer_idx,
                "tokens": int(hidden_states.shape[0]),
                "experts": needed,
                "host": host,
                "waves": len(waves),
                "wait_s": self._call_wait,  # host time blocked on copies (the stall, on CPU)
                "host_s": self._call_host,  # time in the host lane (`_host_part`), on the host clock
                "start": start - self._t0,
                "end": time.perf_counter() - self._t0,
                "hits": counters.hits - before[0],
                "misses": counters.misses - before[1],
                "prefetch_used": counters.prefetch_used - before[2],
                "bytes_loaded": counters.bytes_loaded - before[3],
            }
        )
        return out

    def _host_part(self, layer, host, routing, hidden_states, top_k_weights, host_inputs, device_out):
        """The host lane (`host_lane.py`): one pass over `host`'s experts on the host store's
        stored bytes and the routed tokens' hidden states, summed in fp32 in a fixed order and
        added to the device part (rounded once by the caller), so results do not depend on timing."""
        start = time.perf_counter()
        if host_inputs:
            hidden, weights = host_inputs
        else:  # a large call: read what the host lane needs now (a second read, prefill only)
            hidden, weights = hidden_states.cpu(), top_k_weights.cpu()
        acc = self.host_lane.run(layer, host, routing, hidden, weights)
        counters = self.cache.counters[layer.layer_idx]
        counters.host_experts += len(host)
        self._call_host = time.perf_counter() - start
        counters.host_seconds += self._call_host
        if hidden_states.device.type != "cpu":
            acc = acc.pin_memory().to(hidden_states.device, non_blocking=True)
        return acc if device_out is None else device_out.float() + acc

    # -- internals ---------------------------------------------------------------
    def _read(self, top_k_index: torch.Tensor, extra: tuple = ()) -> tuple[np.ndarray, tuple]:
        """The one device->host read of a MoE layer: its routing, every guess the predictor made
        since the last read, and the `extra` tensors (hidden states and routing weights for the
        host lane): one transfer, one synchronisation. The guesses become prefetches here,
        before the layer's own demand loads are planned. Returns (routing [T, k], extra on host)."""
        if not self._pending and (not extra or top_k_index.device.type == "cpu"):
            # no guesses to read (predictor "none", most layers of the others), and on a CPU
            # device `extra` is on the host already: the routing alone
            return top_k_index.cpu().numpy(), extra
        pending, self._pending = self._pending, []
        tensors = [top_k_index.reshape(-1)]
        for _, guesses in pending:
            for guess in guesses:
                tensors.extend(t.reshape(-1) for t in guess.tensors())
        if len(tensors) == 1:
            flat = tensors[0]
        else:  # `.to` of a tensor already long still costs a dispatch (~1 us on CPU)
            flat = torch.cat([t if t.dtype is torch.long else t.to(torch.long) for t in tensors])
        if extra and flat.device.type != "cpu":
            # Different dtypes, one transfer: as bytes, the integers first (8-byte aligned).
            flat = flat.to(torch.long)
            parts = [flat.view(torch.uint8)] + [t.contiguous().reshape(-1).view(torch.uint8) for t in extra]
            raw = torch.cat(parts).cpu()
            host = raw[: parts[0].numel()].view(torch.long).numpy()
            offset, extra_host = parts[0].numel(), []
            for t, part in zip(extra, parts[1:]):
                extra_host.append(raw[offset : offset + part.numel()].view(t.dtype).reshape(t.shape))
                offset += part.numel()
            extra = tuple(extra_host)
        else:
            host = flat.cpu().numpy()  # on a CPU device `extra` is on the host already
        routing = host[: top_k_index.numel()].reshape(top_k_index.shape)
        offset = top_k_index.numel()
        for origin, guesses in pending:
            said = []
            for guess in guesses:
                values = []
                for t in guess.tensors():
                    values.append(host[offset : offset + t.numel()].reshape(t.shape))
                    offset += t.numel()
                said.append(settle(guess, values))
            if said:
                self.predictions.append({"step": self.step, "layer_idx": origin, "predictions": said})
            self.scheduler.prefetch(origin, said)
        return routing, extra

    def _run_wave(self, layer, wave, routing, hidden_states, top_k_index, top_k_weights, alone):
        waited = time.perf_counter()
        slots = self.scheduler.acquire(layer.layer_idx, wave)
        self._call_wait += time.perf_counter() - waited
        try:
            slot_list = [slots[e] for e in wave]
            return self._on_slots(layer, wave, slot_list, routing, hidden_states, top_k_index, top_k_weights, alone)
        finally:
            self.scheduler.release(slots.values())

    def _on_slots(self, layer, wave, slot_list, routing, hidden_states, top_k_index, top_k_weights, alone):
        """The stock kernel on `wave`'s experts, held (and landed) in `slot_list`: on the span of
        the pool they lie in when it is tight, else gathered into the working buffer."""
        if self.config.verify_slots:
            self.verify()  # debug: every ready slot, not only this wave's
        lo, hi = min(slot_list), max(slot_list) + 1
        if hi - lo == 1:
            # Never a one-expert span: the stock kernel's histc(bins=1, min=0, max=0) then
            # takes its range from the data, a device->host read (a sync on CUDA). The extra
            # row is a resident slot no pair points at: an empty group, never computed.
            lo, hi = (lo, hi + 1) if hi < self.cache.num_slots else (lo - 1, hi)
        if hi - lo <= layer.num_experts and self.codec.identity:
            self.kernel_calls["span"] += 1
            return self._compute(
                layer, wave, slot_list, routing, hidden_states, top_k_index, top_k_weights, alone, lo, hi
            )
        # Slots scattered over the pool: gather the routed experts, a few at a time.
        self.kernel_calls["gathered"] += 1
        width = self.pool.work_slots
        out = None
        for i in range(0, len(wave), width):
            part = self._compute(
                layer,
                wave[i : i + width],
                slot_list[i : i + width],
                routing,
                hidden_states,
                top_k_index,
                top_k_weights,
                alone and len(wave) <= width,
            )
            out = part if out is None else out + part
        return out

    def _compute(
        self, layer, experts, slots, routing, hidden_states, top_k_index, top_k_weights, alone, lo=None, hi=None
    ):
        """The stock kernel on `experts` (held in `slots`): on the pool span lo..hi, or (lo None)
        on copies gathered into the working buffer. `alone`: every routed pair is in `experts`.
        `routing`: `top_k_index` as read to the host, so which tokens a wave covers is known
        without reading the device again."""
        num = layer.num_experts
        if lo is None:
            index = self._to_device(slots)
            work = self.pool.work[: len(slots)]
            if self.codec.identity:
                torch.index_select(self.pool.buffer, 0, index, out=work)
            else:
                staged = self.pool.staging[: len(slots)]
                torch.index_select(self.pool.buffer, 0, index, out=staged)
                self.codec.decode(staged, work, self.pool.scratch)  # a wave at once on CUDA
            # at least two rows, as for a span (the histc read); rows past len(slots) are not routed to
            width = max(len(slots), min(2, self.pool.work_slots))
            proxy = self._work_proxy(layer, width)
            local = list(range(len(slots)))
        else:
            proxy = self._span_proxy(layer, lo, hi)
            if alone:
                # Every routed expert is resident and in this span: the device table maps them.
                # `take`: the same gather as indexing, at a third of its host time on CPU (it
                # takes long indices only)
                table = self._shifted_table(layer, lo)
                slot_index = torch.take(table, top_k_index) if top_k_index.dtype is torch.long else table[top_k_index]
                return self.kernel(proxy, hidden_states, slot_index, top_k_weights)
            local = [s - lo for s in slots]
        # expert id -> index in the proxy for these experts only; every other expert (and the
        # expert-parallel sentinel row) maps to -1. Mapped on the host's copy of the routing: one
        # small upload and no gather on the device (half the host time of the device gather on CPU).
        lut = np.full(num + 1, -1, dtype=np.int64)
        lut[experts] = local
        slot_index = self._to_device(lut.take(routing, mode="clip"))  # clip: ids clamped to 0..num, as before
        if alone:
            return self.kernel(proxy, hidden_states, slot_index, top_k_weights)
        # A wave covers only some pairs: other pairs point at a wave slot with weight 0,
        # and only tokens with at least one pair in this wave are computed.
        # The tokens with a pair in this wave, from the host's copy of the routing: a
        # `nonzero` on the device would synchronise before the kernel is enqueued (and after
        # the wait on this wave's copies), so the host lane could not run beside the link.
        in_wave = slot_index >= 0
        rows = self._to_device(np.flatnonzero(np.isin(routing, experts).any(axis=-1)).tolist())
        sub_index = torch.where(in_wave[rows], slot_index[rows], local[0])
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

    def _to_device(self, values: list[int] | np.ndarray) -> torch.Tensor:
        """A small index tensor on the device, without synchronising: staged through pinned
        memory (the caching host allocator keeps the block until the copy has run)."""
        host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _slot_table(self, layer: MoELayer) -> torch.Tensor:
        """Expert id -> slot of `layer` on the device (-1 if absent; the extra last row is
        transformers' expert-parallel sentinel). Rewritten only when the layer's residents
        change: O(num_experts of the layer), never O(pool)."""
        version = self.cache.layer_version[layer.layer_idx]
        cached = self._tables.get(layer.layer_idx)
        if cached is not None and cached[0] == version:
            return cached[1]
        resident = self.cache.resident[layer.layer_idx]
        table = self._to_device([resident.get(e, -1) for e in range(layer.num_experts)] + [-1])
        self._tables[layer.layer_idx] = (version, table)
        return table

    def _shifted_table(self, layer: MoELayer, lo: int) -> torch.Tensor:
        """`_slot_table(layer) - lo`, kept until the layer's residents or the span start change."""
        version = self.cache.layer_version[layer.layer_idx]
        cached = self._shifted.get(layer.layer_idx)
        if cached is not None and cached[0] == version and cached[1] == lo:
            return cached[2]
        table = self._slot_table(layer) - lo
        self._shifted[layer.layer_idx] = (version, lo, table)
        return table

    def _span_proxy(self, layer: MoELayer, lo: int, hi: int):
        cached = self._spans.get(layer.layer_idx)
        if cached is not None and cached[0] == lo and cached[1] == hi:
            return cached[2]
        proxy = self._proxy(layer, self.pool.params, lo, hi)
        self._spans[layer.layer_idx] = (lo, hi, proxy)
        return proxy

    def _work_proxy(self, layer: MoELayer, width: int):
        """The proxy on the first `width` rows of the working buffer: fixed views, made once."""
        key = (layer.layer_idx, width)
        proxy = self._work_proxies.get(key)
        if proxy is None:
            proxy = self._work_proxies[key] = self._proxy(layer, self.pool.work_params, 0, width)
        return proxy

    def _proxy(self, layer: MoELayer, params: dict, lo: int, hi: int):
        """A stand-in for the experts module whose weights are rows lo..hi-1 of `params`."""
        module = layer.experts
        proxy = object.__new__(type(module))
        proxy.__dict__.update(module.__dict__)
        proxy.__dict__["_parameters"] = {}
        for name, param in params.items():
            proxy.__dict__[name] = param[lo:hi]
        proxy.__dict__["num_experts"] = hi - lo
        return proxy

    def _drain_stalls(self, flush: bool = False) -> None:
        for layer_idx, seconds in self.loader.take_stalls(flush=flush).items():
            self.cache.add_stall(layer_idx, seconds)
        for step, seconds in self.loader.take_step_stalls().items():
            self.step_stalls[step] = self.step_stalls.get(step, 0.0) + seconds
        for layer_idx, seconds in self.loader.take_blocked().items():
            self.cache.counters[layer_idx].blocked_seconds += seconds
        while len(self.step_stalls) > self.history:
            del self.step_stalls[next(iter(self.step_stalls))]

    # -- public API ----------------------------------------------------------------
    def verify(self) -> None:
        """Debug check: every READY slot holds exactly the bytes of the expert the cache says
        it holds. Raises AssertionError naming the first slot that does not."""
        for slot, key in enumerate(self.cache.key_of):
            if key is None or self.cache.state[slot] is not SlotState.READY:
                continue
            if not torch.equal(self.pool.slot(slot).cpu(), self.store[key]):
                raise AssertionError(f"slot {slot} does not hold layer {key[0]} expert {key[1]}")

    def stats(self, flush: bool = False) -> dict:
        """Counters since attach (or the last `reset_stats`): totals and `per_layer`.

        On CUDA, stalls are timed with events and counted once those have completed; `flush`
        waits for the pending ones (one synchronisation), as a report at the end of a run does."""
        self._drain_stalls(flush=flush)
        totals = asdict(self.cache.totals())
        routed = totals["hits"] + totals["misses"] + totals["host_experts"]
        issued = totals["prefetch_issued"]
        return {
            **totals,
            # device hits over every routed expert, wherever it ran
            "hit_rate": totals["hits"] / routed if routed else 0.0,
            # copies to the device: demand loads (a miss that waited) and prefetches/uploads that
            # were not cancelled; used: the demand loads and the prefetches a layer then used
            "uploads": totals["misses"] + issued - totals["prefetch_dropped"],
            "uploads_used": totals["misses"] + totals["prefetch_used"],
            "ran": lanes.ran(totals),  # device hit, uploaded then hit, waited, host
            "on_miss": self.placement.on_miss,
            "host_threads": torch.get_num_threads(),
            "prefetch_precision": totals["prefetch_used"] / issued if issued else 0.0,
            "per_layer": [{"layer_idx": l, **asdict(c)} for l, c in sorted(self.cache.counters.items())],
            "stall_by_step": dict(self.step_stalls),
            "cache_slots": self.cache.num_slots,
            "expert_bytes": self.codec.nbytes,  # as stored and moved
            "experts_dtype": self.codec.name,
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
            "kernel_calls": dict(self.kernel_calls),
            "fast_path_calls": self.fast_path_calls,  # layer calls with every routed expert resident
            # the host lane: passes (one per layer call with host experts), kernel calls per kind,
            # which kernel ran each parameter (int8 / int4: compiled, or torch's packed kernels),
            # and why the compiled kernels run or not (experts/cpu_kernels.py)
            "host_passes": self.host_lane.passes,
            "host_kernel_calls": dict(self.host_lane.calls),
            "host_kernels": self.host_lane.describe(),
            "host_kernels_reason": self.host_lane.kernels_reason,
            # one-row decode steps with oneDNN off on a CPU device, and why (model/decode_gemv.py)
            **(self.decode_gemv.stats() if getattr(self, "decode_gemv", None) else {}),
        }

    def replace_experts(self, encoded: dict) -> None:
        """New weights for some experts: `{(layer_idx, expert_id): stored parts}` (`codec.encode` of
        some or all of an expert's parameters), as an attached model's `load_state_dict` hands them
        (guards.py). Every queued copy lands first, since none may read a host row while it is
        rewritten, and the device finishes the kernels that read the slots; then the store is
        rewritten and each slot holding one of these experts copied again. The cache keeps its
        state and counters: the next forward computes with the new weights wherever it runs them."""
        self.loader.drain()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.scheduler.reap()
        self.host_lane.forget(encoded)  # int8 scales it prepared from the old bytes
        for key, parts in encoded.items():
            self.store.update(key, parts)
            slot = self.cache.slot_of.get(key)
            if slot is not None:
                self.pool.slot(slot).copy_(self.store[key])

    def reset_stats(self) -> None:
        self._drain_stalls(flush=True)
        self.cache.reset_counters()
        self.trace.clear()
        self.predictions.clear()
        self.step_starts.clear()
        self.step_stalls.clear()
        self.kernel_calls = dict.fromkeys(self.kernel_calls, 0)
        self.fast_path_calls = 0
        self.host_lane.calls = dict.fromkeys(self.host_lane.calls, 0)
        self.host_lane.passes = 0
        self.step = -1

    def detach(self):
        """Put the model back exactly as it was: experts in place, stock implementation.
        Releases the slots, the loader thread or stream, and the host store, so the next
        attach in this process can reuse the device memory."""
        if not self._attached:
            return self.model
        self.loader.close()
        self._restore()
        self.scheduler.close()  # its references to the pool and the loader go with it
        self._tables.clear()
        self._spans.clear()
        self._work_proxies.clear()
        self._shifted.clear()
        self._pending.clear()
        self.host_lane.close()  # its views of the store go before the store
        self.predictor = None
        self.pool.close()  # slots, working buffer, the device decode's scratch
        self.pool = None
        release_scratch()  # and the host decode's
        self.store.close()
        self._attached = False
        return self.model

    @property
    def attached(self) -> bool:
        return self._attached
