"""The device slot pool: preallocated once, never per token.

One `[num_slots, spec.numel]` buffer, so one copy fills one slot; per-parameter views
shaped like the model's fused expert parameters with the slot as the leading dimension,
so the stock expert kernels run on them unchanged.
"""

from __future__ import annotations

import torch

from .errors import CacheCapacityError
from .layout import ExpertSpec


class SlotPool:
    def __init__(self, spec: ExpertSpec, num_slots: int, device: torch.device):
        self.spec = spec
        self.num_slots = num_slots
        self.device = device
        try:
            self.buffer = torch.zeros(num_slots, spec.numel, dtype=spec.dtype, device=device)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and "memory" not in str(err).lower():
                raise
            raise CacheCapacityError(
                f"out of device memory allocating {num_slots} slots x {spec.nbytes / 2**20:.1f} MiB "
                f"= {num_slots * spec.nbytes / 2**30:.2f} GiB; lower cache_slots or cache_budget "
                f"({str(err).splitlines()[0]})"
            ) from None
        self.params = spec.views(self.buffer)

    def slot(self, slot: int) -> torch.Tensor:
        return self.buffer[slot]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()
