"""Moves expert bytes from the host store into device slots, off the compute path.

Two backends behind one interface:
- `CudaStreamLoader`: a dedicated copy stream and one event per slot. The compute stream
  waits on a slot's event only when it needs that expert; that wait is the stall, timed with
  CUDA events. Before overwriting a slot the copy stream waits on the slot's release event,
  recorded after the last kernel that read it, so a copy never races a running kernel.
- `ThreadLoader`: a worker thread (torch copies release the GIL). The same scheduling logic
  runs on CPU-only machines and CI; the stall is the time the compute thread blocks.

Both run demand loads (priority 0) before prefetches (priority = layers until needed), and
drop queued prefetches on `cancel`. A copy that fails is re-raised as `LoaderError` in the
caller at the next `wait` or `done` that touches the loader: never a hang, never stale bytes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .errors import LoaderError

logger = logging.getLogger(__name__)

DEMAND = 0.0


@dataclass(order=True)
class _Ticket:
    priority: float
    seq: int
    slot: int = field(compare=False)
    src: torch.Tensor = field(compare=False, repr=False)
    dst: torch.Tensor = field(compare=False, repr=False)
    tag: object = field(compare=False, default=None)
    queued: float = field(compare=False, default=0.0)


class Loader:
    """Interface. `tag` is opaque to the loader and comes back in `events` (the timeline)."""

    kind = "abstract"
    reason = ""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.events: list[dict] = []  # one per finished copy: slot, tag, queued, start, end, bytes
        self._stalls: dict[int, float] = defaultdict(float)
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

    def take_stalls(self) -> dict[int, float]:
        """Stall seconds per layer since the last call."""
        stalls, self._stalls = dict(self._stalls), defaultdict(float)
        return stalls

    def close(self) -> None:
        pass

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise LoaderError(f"copying an expert into its slot failed: {self._error!r}") from self._error


class ThreadLoader(Loader):
    """CPU backend: one worker thread drains a priority queue of copies."""

    kind = "cpu-thread"

    def __init__(self, num_slots: int, link_bandwidth: float | None = None, t0: float | None = None):
        super().__init__(num_slots)
        self.link_bandwidth = link_bandwidth
        self.reason = "worker thread: CPU device (torch copies release the GIL)"
        if link_bandwidth:
            self.reason += f", paced to {link_bandwidth / 1e9:.3g} GB/s"
        self._heap: list[_Ticket] = []
        self._pending: dict[int, int] = {}  # slot -> seq of its live ticket
        self._done = [threading.Event() for _ in range(num_slots)]
        for event in self._done:
            event.set()
        self._active: int | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._t0 = time.perf_counter() if t0 is None else t0  # events share the runtime's clock
        self._thread = threading.Thread(target=self._run, name="moe-prefetch-loader", daemon=True)
        self._thread.start()

    def submit(self, slot, src, dst, priority, tag=None):
        self._raise_if_failed()
        with self._cv:
            ticket = _Ticket(priority, next(self._seq), slot, src, dst, tag, time.perf_counter() - self._t0)
            self._pending[slot] = ticket.seq
            self._done[slot].clear()
            heapq.heappush(self._heap, ticket)
            self._cv.notify()

    def done(self, slot):
        self._raise_if_failed()
        return self._done[slot].is_set()

    def wait(self, slot, layer_idx):
        if self._done[slot].is_set():
            self._raise_if_failed()
            return
        self._promote(slot)
        start = time.perf_counter()
        while not self._done[slot].wait(0.05):
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise LoaderError("the loader thread has stopped; detach and attach again")
        self._stalls[layer_idx] += time.perf_counter() - start
        self._raise_if_failed()

    def _promote(self, slot: int) -> None:
        """A queued prefetch is needed now: move it ahead of everything else."""
        with self._cv:
            seq = self._pending.get(slot)
            if seq is None or self._active == slot:
                return
            old = next((t for t in self._heap if t.seq == seq), None)
            if old is not None and old.priority > DEMAND:
                ticket = _Ticket(DEMAND, next(self._seq), slot, old.src, old.dst, old.tag, old.queued)
                self._pending[slot] = ticket.seq
                heapq.heappush(self._heap, ticket)
                self._cv.notify()

    def cancel(self, slot):
        with self._cv:
            if slot in self._pending and self._active != slot:
                del self._pending[slot]
                self._done[slot].set()
                return True
        return False

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                ticket = heapq.heappop(self._heap)
                if self._pending.get(ticket.slot) != ticket.seq:
                    continue  # cancelled or superseded by a promotion
                self._active = ticket.slot
            try:
                start = time.perf_counter()
                ticket.dst.copy_(ticket.src)
                nbytes = ticket.src.numel() * ticket.src.element_size()
                if self.link_bandwidth:
                    # Pace like a link of this bandwidth; used to validate the simulator on CPU.
                    remaining = nbytes / self.link_bandwidth - (time.perf_counter() - start)
                    if remaining > 0:
                        time.sleep(remaining)
                end = time.perf_counter()
            except BaseException as err:  # surfaced in the caller; wake every waiter
                logger.error("expert copy into slot %d failed: %r", ticket.slot, err)
                with self._cv:
                    self._error = err
                    self._active = None
                    for event in self._done:
                        event.set()
                return
            with self._cv:
                self._active = None
                if self._pending.get(ticket.slot) == ticket.seq:
                    del self._pending[ticket.slot]
                    self._done[ticket.slot].set()
                self.events.append(
                    {
                        "slot": ticket.slot,
                        "tag": ticket.tag,
                        "queued": ticket.queued,
                        "start": start - self._t0,
                        "end": end - self._t0,
                        "bytes": nbytes,
                    }
                )

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._pending.clear()
            self._cv.notify_all()
        self._thread.join(timeout=5)


class CudaStreamLoader(Loader):
    """CUDA backend: copies on a dedicated stream, ordered by a host-side priority queue.

    Demand copies are issued at once; prefetches wait in the queue and at most
    `max_inflight` of them are on the stream at a time, so a demand copy issued later
    never queues behind a long tail of speculative ones.
    """

    kind = "cuda-stream"

    def __init__(self, num_slots: int, device: torch.device, max_inflight: int = 2):
        super().__init__(num_slots)
        self.device = device
        self.max_inflight = max_inflight
        self.reason = "copy stream + per-slot events: CUDA device"
        self.stream = torch.cuda.Stream(device=device)
        self._copied = [torch.cuda.Event() for _ in range(num_slots)]
        self._released = [torch.cuda.Event() for _ in range(num_slots)]
        self._heap: list[_Ticket] = []
        self._queued: dict[int, int] = {}  # slot -> seq, not yet on the stream
        self._inflight: list[int] = []
        self._stall_events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def submit(self, slot, src, dst, priority, tag=None):
        self._raise_if_failed()
        ticket = _Ticket(priority, next(self._seq), slot, src, dst, tag)
        if priority <= DEMAND:
            self._issue(ticket)
        else:
            self._queued[slot] = ticket.seq
            heapq.heappush(self._heap, ticket)
        self._pump()

    def _issue(self, ticket: _Ticket) -> None:
        self._queued.pop(ticket.slot, None)
        try:
            with torch.cuda.stream(self.stream):
                # Never overwrite a slot a kernel on the compute stream may still be reading.
                self.stream.wait_event(self._released[ticket.slot])
                ticket.dst.copy_(ticket.src, non_blocking=True)
                self._copied[ticket.slot].record(self.stream)
        except BaseException as err:
            self._error = err
            self._raise_if_failed()
        self._inflight.append(ticket.slot)
        self.events.append(
            {"slot": ticket.slot, "tag": ticket.tag, "bytes": ticket.src.numel() * ticket.src.element_size()}
        )

    def _pump(self) -> None:
        self._inflight = [s for s in self._inflight if not self._copied[s].query()]
        while self._heap and len(self._inflight) < self.max_inflight:
            ticket = heapq.heappop(self._heap)
            if self._queued.get(ticket.slot) == ticket.seq:
                self._issue(ticket)

    def done(self, slot):
        self._raise_if_failed()
        self._pump()
        return slot not in self._queued and self._copied[slot].query()

    def wait(self, slot, layer_idx):
        self._raise_if_failed()
        seq = self._queued.get(slot)
        if seq is not None:
            ticket = next(t for t in self._heap if t.seq == seq)
            self._issue(ticket)
        if self._copied[slot].query():
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        compute = torch.cuda.current_stream(self.device)
        start.record(compute)
        compute.wait_event(self._copied[slot])  # the stall: compute idles until the copy lands
        end.record(compute)
        self._stall_events.append((layer_idx, start, end))

    def cancel(self, slot):
        if slot in self._queued:
            del self._queued[slot]
            return True
        return False

    def release(self, slot):
        self._released[slot].record(torch.cuda.current_stream(self.device))

    def take_stalls(self):
        if self._stall_events:
            torch.cuda.current_stream(self.device).synchronize()
            for layer_idx, start, end in self._stall_events:
                self._stalls[layer_idx] += start.elapsed_time(end) / 1e3
            self._stall_events.clear()
        return super().take_stalls()

    def close(self) -> None:
        self.stream.synchronize()
        self._heap.clear()
        self._queued.clear()


def make_loader(
    device: torch.device, num_slots: int, link_bandwidth: float | None = None, t0: float | None = None
) -> Loader:
    """The stream loader on CUDA, the thread loader elsewhere; `.reason` says why. Event
    times count from `t0` (a `time.perf_counter()` value), the runtime's clock."""
    if device.type == "cuda":
        return CudaStreamLoader(num_slots, device)
    return ThreadLoader(num_slots, link_bandwidth=link_bandwidth, t0=t0)
