"""Moves expert bytes from the host store into device slots, off the compute path.

One design, two backends. A worker thread drains a priority queue of copies, demand loads
(priority 0) before prefetches (priority = layers until needed), and moves each expert in
chunks of `chunk_bytes`. Between chunks it looks at the queue again, so a demand copy waits
for at most the chunk in progress (plus the few already handed to the copy engine), never for
a whole speculative expert of hundreds of MiB. Because the thread feeds the link on its own,
the link stays busy between the compute thread's visits.

- `CudaStreamLoader`: the worker issues each chunk on a dedicated copy stream and keeps at most
  `max_inflight` chunks on it: a ring deep enough for `RING_SECONDS` of link time (`ring_depth`),
  so the link stays busy while the worker waits for the GIL (it needs it once per chunk, and the
  compute thread holds it for its per-layer Python), and no deeper, since the ring is also how
  long a demand copy can queue behind speculation. Before the first chunk into a slot the copy
  stream waits on the slot's release event, recorded after the last kernel that read it, so a
  copy never races a running kernel. After the last chunk it records the slot's copy event; the
  compute stream waits on that event only when it needs the expert. That wait is the stall,
  timed with CUDA events and drained without blocking once they have completed. Before it, the
  compute thread may block until the worker has issued the copy's last chunk (the event must be
  recorded before a stream can wait on it): that host time is counted apart (`take_blocked`),
  never as stall.
- `ThreadLoader`: the worker copies synchronously (torch copies release the GIL). The same
  scheduling logic runs on CPU-only machines and CI; the stall is the time the compute thread
  blocks.

A copy that fails is re-raised as `LoaderError` in the caller at the next `wait`, `done` or
`submit`: never a hang, never stale bytes. Queued prefetches can be cancelled before their
first chunk starts.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..errors import LoaderError

logger = logging.getLogger(__name__)

DEMAND = 0.0
CHUNK_BYTES = 8 << 20  # one chunk at PCIe 4.0 (~25 GB/s) is ~0.3 ms
HISTORY = 4096  # copies kept in `events` unless recording is switched on
# Link time kept queued on the copy stream. The worker thread needs the GIL to issue each chunk;
# a ring of two 8 MiB chunks is ~0.3 ms at 50 GB/s, less than one layer's Python on the compute
# thread, so the link idled whenever the worker waited for the GIL.
RING_SECONDS = 2e-3
# The ring is sized for at least this link speed (PCIe 5.0 x16, achieved), so that it holds
# RING_SECONDS on any common link: the placement's default link speed (25 GB/s) is a
# deliberately modest desktop, and a ring sized on it would hold under 1 ms on a faster card.
RING_LINK_FLOOR = 50e9


def ring_depth(link_bytes_per_s: float, chunk_bytes: int = CHUNK_BYTES, seconds: float = RING_SECONDS) -> int:
    """Chunks the copy stream keeps in flight so that `seconds` of copying at `link_bytes_per_s`
    is queued (at least two: one moving, one behind it). Bounds how long a demand copy can queue
    behind prefetches already on the stream: about `seconds` on that link."""
    if not link_bytes_per_s > 0 or math.isinf(link_bytes_per_s):
        raise ValueError(f"link_bytes_per_s={link_bytes_per_s!r} must be a positive, finite bytes/s")
    return max(2, math.ceil(seconds * link_bytes_per_s / chunk_bytes))


@dataclass(order=True)
class _Ticket:
    priority: float
    seq: int
    slot: int = field(compare=False)
    src: torch.Tensor = field(compare=False, repr=False)
    dst: torch.Tensor = field(compare=False, repr=False)
    tag: object = field(compare=False, default=None)
    queued: float = field(compare=False, default=0.0)
    offset: int = field(compare=False, default=0)  # elements already copied
    start: float = field(compare=False, default=-1.0)


class Loader:
    """Interface. `tag` is opaque to the loader and comes back in `events` (the timeline).

    `events` keeps the latest HISTORY copies; `record(True)` keeps every one (for reports).
    `step` is set by the runtime so stalls can be attributed to the token that suffered them.
    """

    kind = "abstract"
    reason = ""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.events: collections.deque | list = collections.deque(maxlen=HISTORY)
        self.step = -1
        self._stalls: dict[int, float] = defaultdict(float)
        self._step_stalls: dict[int, float] = defaultdict(float)
        self._blocked: dict[int, float] = defaultdict(float)
        self._seq = itertools.count()
        self._error: BaseException | None = None

    def submit(self, slot: int, src: torch.Tensor, dst: torch.Tensor, priority: float, tag: object = None) -> None:
        raise NotImplementedError

    def done(self, slot: int) -> bool:
        raise NotImplementedError

    def wait(self, slot: int, layer_idx: int) -> None:
        raise NotImplementedError

    def cancel(self, slot: int) -> bool:
        raise NotImplementedError

    def release(self, slot: int) -> None:
        """The compute side has finished issuing reads of `slot`."""

    def release_all(self, slots) -> None:
        """`release` of each of `slots`, whose reads were all issued together."""
        for slot in slots:
            self.release(slot)

    def left(self, slot: int) -> float:
        """Share of `slot`'s copy still to move (1.0: not started, or not known)."""
        return 1.0

    def record(self, on: bool, keep: int = HISTORY) -> None:
        """Keep every copy in `events` (on) or only the latest `keep` (off)."""
        self.events = list(self.events) if on else collections.deque(self.events, maxlen=keep)

    def take_stalls(self, flush: bool = False) -> dict[int, float]:
        """Stall seconds per layer since the last call (`flush`: wait for pending timings)."""
        stalls, self._stalls = dict(self._stalls), defaultdict(float)
        return stalls

    def take_step_stalls(self) -> dict[int, float]:
        """Stall seconds per step since the last call (filled as `take_stalls` drains)."""
        stalls, self._step_stalls = dict(self._step_stalls), defaultdict(float)
        return stalls

    def take_blocked(self) -> dict[int, float]:
        """Host seconds per layer since the last call that the compute thread spent blocked
        until a copy's last chunk was issued, where that is not the stall itself (CUDA: the
        stall is the compute stream's wait, timed by events; on CPU the block is the stall)."""
        blocked, self._blocked = dict(self._blocked), defaultdict(float)
        return blocked

    def drain(self) -> None:
        """Block until every queued copy has landed. Not a stall: no layer is waiting for it."""

    def close(self) -> None:
        pass

    def _add_stall(self, layer_idx: int, step: int, seconds: float) -> None:
        self._stalls[layer_idx] += seconds
        self._step_stalls[step] += seconds

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise LoaderError(f"copying an expert into its slot failed: {self._error!r}") from self._error


class _WorkerLoader(Loader):
    """A worker thread that moves queued copies chunk by chunk, most urgent first.
    Subclasses say how one chunk is copied and what marks a copy finished."""

    def __init__(self, num_slots: int, t0: float | None = None, chunk_bytes: int = CHUNK_BYTES):
        super().__init__(num_slots)
        self.chunk_bytes = chunk_bytes
        self._heap: list[_Ticket] = []
        self._pending: dict[int, int] = {}  # slot -> seq of its live ticket
        # Set once every chunk of the slot's latest copy has been issued (and, on CPU, copied).
        self._issued = [threading.Event() for _ in range(num_slots)]
        for event in self._issued:
            event.set()
        self._active: int | None = None
        self._active_ticket: _Ticket | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._t0 = time.perf_counter() if t0 is None else t0  # events share the runtime's clock
        self._thread = threading.Thread(target=self._run, name="moe-prefetch-loader", daemon=True)

    def submit(self, slot, src, dst, priority, tag=None):
        self._raise_if_failed()
        with self._cv:
            ticket = _Ticket(priority, next(self._seq), slot, src, dst, tag, time.perf_counter() - self._t0)
            self._pending[slot] = ticket.seq
            self._issued[slot].clear()
            heapq.heappush(self._heap, ticket)
            self._cv.notify()

    def cancel(self, slot):
        """Drop a queued copy that has not started; False if it has (it will land)."""
        with self._cv:
            seq = self._pending.get(slot)
            if seq is None or self._active == slot:
                return False
            ticket = next((t for t in self._heap if t.seq == seq), None)
            if ticket is not None and ticket.offset > 0:
                return False  # preempted half way: the slot already holds part of it
            del self._pending[slot]
            self._issued[slot].set()
            return True

    def left(self, slot):
        # Read without stopping the worker: a chunk more or less only shifts a placement estimate.
        if self._issued[slot].is_set():
            return 0.0
        with self._cv:
            ticket = self._active_ticket if self._active == slot else None
            if ticket is None:
                seq = self._pending.get(slot)
                ticket = next((t for t in self._heap if t.seq == seq), None)
        if ticket is None or not ticket.src.numel():
            return 1.0
        return 1.0 - ticket.offset / ticket.src.numel()

    def _await_issued(self, slot: int) -> float:
        """Block the compute thread until `slot`'s copy is issued; returns seconds blocked."""
        if self._issued[slot].is_set():
            self._raise_if_failed()
            return 0.0
        self._promote(slot)
        start = time.perf_counter()
        while not self._issued[slot].wait(0.05):
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise LoaderError("the loader thread has stopped; detach and attach again")
        self._raise_if_failed()
        return time.perf_counter() - start

    def drain(self) -> None:
        with self._cv:
            queued = list(self._pending)
        for slot in queued:
            self._await_issued(slot)  # on CPU a copy has landed once issued; CUDA waits below

    def _promote(self, slot: int) -> None:
        """A queued prefetch is needed now: move it ahead of everything else."""
        with self._cv:
            seq = self._pending.get(slot)
            if seq is None or self._active == slot:
                return
            old = next((t for t in self._heap if t.seq == seq), None)
            if old is not None and old.priority > DEMAND:
                ticket = _Ticket(DEMAND, next(self._seq), slot, old.src, old.dst, old.tag, old.queued, old.offset)
                ticket.start = old.start
                self._pending[slot] = ticket.seq
                heapq.heappush(self._heap, ticket)
                self._cv.notify()

    def _next(self) -> _Ticket | None:
        with self._cv:
            while True:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return None
                ticket = heapq.heappop(self._heap)
                if self._pending.get(ticket.slot) == ticket.seq:  # else cancelled or promoted
                    self._active, self._active_ticket = ticket.slot, ticket
                    return ticket

    def _run(self) -> None:
        while (ticket := self._next()) is not None:
            try:
                finished = self._move(ticket)
            except BaseException as err:  # surfaced in the caller; wake every waiter
                logger.error("expert copy into slot %d failed: %r", ticket.slot, err)
                with self._cv:
                    self._error = err
                    self._active, self._active_ticket = None, None  # the ticket holds views of the pool
                    for event in self._issued:
                        event.set()
                return
            with self._cv:
                self._active, self._active_ticket = None, None  # the ticket holds views of the pool
                if not finished:
                    continue  # requeued behind a more urgent copy
                if self._pending.get(ticket.slot) == ticket.seq:
                    del self._pending[ticket.slot]
                    self._issued[ticket.slot].set()
                self.events.append(
                    {
                        "slot": ticket.slot,
                        "tag": ticket.tag,
                        "queued": ticket.queued,
                        "start": ticket.start,
                        "end": time.perf_counter() - self._t0,
                        "bytes": ticket.src.numel() * ticket.src.element_size(),
                    }
                )

    def _move(self, ticket: _Ticket) -> bool:
        """Copy `ticket` chunk by chunk; False if it was requeued behind a more urgent copy."""
        total = ticket.src.numel()
        if ticket.dst.numel() != total:
            raise ValueError(f"expert of {total} elements copied into a slot of {ticket.dst.numel()}")
        step = max(1, self.chunk_bytes // ticket.src.element_size())
        if ticket.offset == 0:
            ticket.start = time.perf_counter() - self._t0
        while ticket.offset < total:
            end = min(ticket.offset + step, total)
            self._copy(ticket, ticket.offset, end)
            ticket.offset = end
            if end < total and self._heap and self._heap[0].priority < ticket.priority:
                with self._cv:
                    if self._pending.get(ticket.slot) == ticket.seq:
                        heapq.heappush(self._heap, ticket)
                        return False
        self._finish(ticket)
        return True

    def _copy(self, ticket: _Ticket, start: int, end: int) -> None:
        raise NotImplementedError

    def _finish(self, ticket: _Ticket) -> None:
        """Every chunk of `ticket` has been issued."""

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._pending.clear()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class ThreadLoader(_WorkerLoader):
    """CPU backend: the worker copies synchronously; a copy is done once issued."""

    kind = "cpu-thread"

    def __init__(
        self, num_slots: int, link_bandwidth: float | None = None, t0: float | None = None, chunk_bytes=CHUNK_BYTES
    ):
        super().__init__(num_slots, t0=t0, chunk_bytes=chunk_bytes)
        self.link_bandwidth = link_bandwidth
        self.reason = "worker thread: CPU device (torch copies release the GIL)"
        if link_bandwidth:
            self.reason += f", paced to {link_bandwidth / 1e9:.3g} GB/s"
        self._thread.start()

    def _copy(self, ticket, start, end):
        began = time.perf_counter()
        ticket.dst[start:end].copy_(ticket.src[start:end])
        if self.link_bandwidth:
            # Pace like a link of this bandwidth; used to validate the simulator on CPU.
            nbytes = (end - start) * ticket.src.element_size()
            remaining = nbytes / self.link_bandwidth - (time.perf_counter() - began)
            if remaining > 0:
                time.sleep(remaining)

    def release_all(self, slots):
        pass  # kernels on CPU are synchronous: the reads are over before the slots are released

    def done(self, slot):
        self._raise_if_failed()
        return self._issued[slot].is_set()

    def wait(self, slot, layer_idx):
        blocked = self._await_issued(slot)
        if blocked:
            self._add_stall(layer_idx, self.step, blocked)


class CudaStreamLoader(_WorkerLoader):
    """CUDA backend: the worker issues chunks on a dedicated copy stream, at most
    `max_inflight` of them outstanding (`ring_depth` of `link_bytes_per_s` by default), so the
    link stays busy and a demand copy queues behind at most that many chunks.

    `time_copies`: record a pair of timing events on the copy stream around every copy (its
    first chunk's start to its last chunk's end), kept in `copy_timings` as (tag, bytes, start,
    end): what the copy itself took, not when it was queued (`submit` only queues it)."""

    kind = "cuda-stream"

    def __init__(
        self,
        num_slots: int,
        device: torch.device,
        t0: float | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        max_inflight: int | None = None,
        link_bytes_per_s: float = RING_LINK_FLOOR,
        time_copies: bool = False,
    ):
        super().__init__(num_slots, t0=t0, chunk_bytes=chunk_bytes)
        # The worker thread's current device is 0 whatever the compute thread's is: every CUDA
        # call it makes names this device, with its index resolved here, on the compute thread.
        self.device = cuda_device(device)
        link = max(link_bytes_per_s, RING_LINK_FLOOR) if math.isfinite(link_bytes_per_s) else RING_LINK_FLOOR
        self.max_inflight = max_inflight or ring_depth(link, chunk_bytes)
        self.time_copies = time_copies
        self.copy_timings: collections.deque = collections.deque(maxlen=HISTORY)
        self.reason = (
            f"copy stream + per-slot events: CUDA device {self.device}; {chunk_bytes >> 20} MiB chunks, "
            f"{self.max_inflight} in flight ({self.max_inflight * chunk_bytes / link * 1e3:.1f} ms at "
            f"{link / 1e9:.3g} GB/s)"
        )
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(device=self.device)
            self._copied = [torch.cuda.Event() for _ in range(num_slots)]
            # The event a copy into each slot waits on: the slot's own, re-recorded by `release`,
            # or one `release_all` shared among the slots of one call.
            self._own_release = [torch.cuda.Event() for _ in range(num_slots)]
            self._released = list(self._own_release)
            # A ring of chunk events: the oldest is synchronized before it is reused, which is
            # what bounds the chunks outstanding on the copy stream.
            self._ring = [torch.cuda.Event() for _ in range(self.max_inflight)]
        self._ring_pos = 0
        self._ring_used = 0
        self._timing: dict[int, torch.cuda.Event] = {}  # slot -> start event of its copy under way
        self._stall_events: collections.deque = collections.deque()  # (step, layer_idx, start, end)
        self._thread.start()

    def _copy(self, ticket, start, end):
        event = self._ring[self._ring_pos]
        if self._ring_used >= self.max_inflight:
            event.synchronize()  # releases the GIL; the copy engine drains one chunk
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if start == 0:
                # Never overwrite a slot a kernel on the compute stream may still be reading.
                self.stream.wait_event(self._released[ticket.slot])
                if self.time_copies:  # after the wait: the copy's own start on the link
                    began = torch.cuda.Event(enable_timing=True)
                    began.record(self.stream)
                    self._timing[ticket.slot] = began
            ticket.dst[start:end].copy_(ticket.src[start:end], non_blocking=True)
            event.record(self.stream)
        self._ring_pos = (self._ring_pos + 1) % self.max_inflight
        self._ring_used = min(self._ring_used + 1, self.max_inflight)

    def _finish(self, ticket):
        # Recorded before the ticket counts as issued: `wait` must never wait on an event that
        # has not been recorded yet (waiting on an unrecorded event is a no-op in CUDA).
        with torch.cuda.device(self.device):
            self._copied[ticket.slot].record(self.stream)
            began = self._timing.pop(ticket.slot, None)
            if began is not None:
                ended = torch.cuda.Event(enable_timing=True)
                ended.record(self.stream)
                nbytes = ticket.src.numel() * ticket.src.element_size()
                self.copy_timings.append((ticket.tag, nbytes, began, ended))

    def done(self, slot):
        self._raise_if_failed()
        return self._issued[slot].is_set() and self._copied[slot].query()

    def wait(self, slot, layer_idx):
        # Host time until the last chunk is on the stream: the compute thread blocked, the GPU
        # perhaps still busy with queued work. Counted apart; the stall is the event-timed wait.
        blocked = self._await_issued(slot)
        if blocked:
            self._blocked[layer_idx] += blocked
        if self._copied[slot].query():
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        compute = torch.cuda.current_stream(self.device)
        start.record(compute)
        compute.wait_event(self._copied[slot])  # the stall: compute idles until the copy lands
        end.record(compute)
        self._stall_events.append((self.step, layer_idx, start, end))

    def release(self, slot):
        # The slot's own event: a shared one, re-recorded, would delay copies into other slots.
        event = self._released[slot] = self._own_release[slot]
        event.record(torch.cuda.current_stream(self.device))

    def release_all(self, slots):
        # One event for the whole call rather than one record per slot: every slot's reads were
        # enqueued before it. A fresh event, never one re-recorded later, so a copy into a slot
        # waits for that slot's last reader only, not for whatever the compute stream ran since.
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        for slot in slots:
            self._released[slot] = event

    def drain(self) -> None:
        super().drain()
        self.stream.synchronize()

    def take_stalls(self, flush: bool = False):
        """Drain the stall timings whose events have completed; with `flush`, wait for all."""
        if flush and self._stall_events:
            self._stall_events[-1][3].synchronize()
        while self._stall_events and self._stall_events[0][3].query():
            step, layer_idx, start, end = self._stall_events.popleft()
            self._add_stall(layer_idx, step, start.elapsed_time(end) / 1e3)
        return super().take_stalls()

    def close(self) -> None:
        super().close()
        self.stream.synchronize()
        self._stall_events.clear()
        self._timing.clear()


def cuda_device(device: torch.device | str) -> torch.device:
    """`device` with its index: a bare "cuda" is the compute thread's current device. Another
    thread (the loader's worker) would take it as device 0."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def make_loader(
    device: torch.device,
    num_slots: int,
    link_bandwidth: float | None = None,
    t0: float | None = None,
    link_bytes_per_s: float | None = None,
) -> Loader:
    """The stream loader on CUDA, the thread loader elsewhere; `.reason` says why. Event
    times count from `t0` (a `time.perf_counter()` value), the runtime's clock.
    `link_bandwidth` paces the CPU loader (tests); `link_bytes_per_s` sizes the CUDA loader's
    ring (`ring_depth`, never below `RING_LINK_FLOOR`)."""
    if device.type == "cuda":
        return CudaStreamLoader(num_slots, device, t0=t0, link_bytes_per_s=link_bytes_per_s or RING_LINK_FLOOR)
    return ThreadLoader(num_slots, link_bandwidth=link_bandwidth, t0=t0)
