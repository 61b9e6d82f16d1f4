"""The device slot pool: preallocated once, never per token.

One `[num_slots, spec.numel]` buffer, so one copy fills one slot; per-parameter views
shaped like the model's fused expert parameters with the slot as the leading dimension,
so the stock expert kernels run on them unchanged. Beside it, a working buffer of
`work_slots` rows (top_k by default) into which the runtime gathers a layer's routed experts
when their slots are scattered over the pool (see runtime.py).

Compressed experts (`compression.Codec`): the slots hold the stored bytes, and the working
buffer holds decoded parameters in the model's dtype; `staging` receives the gathered
stored rows, which the codec decodes into `work`, its temporaries carved from `scratch` (on
CUDA, where a wave is decoded in one batch: `compression.Scratch`). All of it is allocated
here, once, and given back by `close`.
"""

from __future__ import annotations

import torch

from ..errors import CacheCapacityError
from ..experts.compression import Codec, Scratch, make_codec, scratch_bytes
from ..experts.layout import ExpertSpec


class SlotPool:
    def __init__(
        self, spec: ExpertSpec, num_slots: int, device: torch.device, work_slots: int = 1, codec: Codec | None = None
    ):
        self.spec = spec
        self.codec = codec or make_codec(spec)
        layout = self.codec.stored
        self.num_slots = num_slots
        self.work_slots = work_slots
        self.device = device
        self.staging = None
        self.scratch = None
        # Only the device decodes a wave in one batch (compression._single_pass); the host decodes
        # one expert at a time through its own small buffers.
        scratch = scratch_bytes(self.codec, work_slots) if torch.device(device).type == "cuda" else 0
        try:
            self.buffer = torch.zeros(num_slots, layout.numel, dtype=layout.dtype, device=device)
            self.work = torch.zeros(work_slots, spec.numel, dtype=spec.dtype, device=device)
            if not self.codec.identity:
                self.staging = torch.zeros(work_slots, layout.numel, dtype=layout.dtype, device=device)
            if scratch:
                self.scratch = Scratch(torch.empty(scratch, dtype=torch.uint8, device=device))
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and "memory" not in str(err).lower():
                raise
            raise CacheCapacityError(
                f"out of device memory allocating {num_slots} slots (+ {work_slots} working) "
                f"x {layout.nbytes / 2**20:.1f} MiB "
                f"= {(num_slots * layout.nbytes + work_slots * spec.nbytes) / 2**30:.2f} GiB; "
                "lower cache_slots or cache_budget "
                f"({str(err).splitlines()[0]})"
            ) from None
        self.params = spec.views(self.buffer) if self.codec.identity else {}  # slots as parameters
        self.work_params = spec.views(self.work)

    def slot(self, slot: int) -> torch.Tensor:
        return self.buffer[slot]

    @property
    def nbytes(self) -> int:
        extra = [t for t in (self.work, self.staging, self.scratch and self.scratch.buffer) if t is not None]
        return self.buffer.numel() * self.buffer.element_size() + sum(t.numel() * t.element_size() for t in extra)

    def close(self) -> None:
        """Drop the device tensors (slots, working buffer, staging, decode scratch); the
        allocator can hand the memory to the next attach."""
        self.params = self.work_params = {}
        self.buffer = self.work = self.staging = self.scratch = None
