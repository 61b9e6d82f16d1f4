"""The host expert store: the master copy of every expert, one flat buffer each.

Buffers live in chunks well under 4 GiB (pinning one huge block is slow and can fail on
some drivers). On CUDA the chunks are pinned so the copy engine can DMA from them and the
copy can overlap compute; if pinning fails we fall back to pageable memory and say so.
Evictions never write back: the device slots are read-only copies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping

import psutil
import torch

from .cache import Key
from .errors import HostMemoryError
from .layout import ExpertSpec

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 30  # 1 GiB


def check_host_memory(needed: int) -> None:
    """Refuse up front when a store of `needed` bytes cannot fit in available RAM."""
    available = psutil.virtual_memory().available
    if needed > available:
        raise HostMemoryError(
            f"the host expert store needs {needed / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB of RAM "
            "is available; free memory, use a machine with more RAM, or a smaller dtype"
        )


class HostStore(Mapping[Key, torch.Tensor]):
    """Read-only mapping `(layer_idx, expert_id) -> flat host tensor of spec.numel`."""

    def __init__(self, spec: ExpertSpec, keys: Iterable[Key], pin: bool):
        self.spec = spec
        keys = list(keys)
        per_chunk = max(1, CHUNK_BYTES // spec.nbytes)
        self.pinned = pin
        self.pin_reason = "pinned: CUDA device, so copies can be asynchronous" if pin else "pageable: CPU device"
        self._chunks: list[torch.Tensor] = []
        self._index: dict[Key, torch.Tensor] = {}
        for start in range(0, len(keys), per_chunk):
            group = keys[start : start + per_chunk]
            chunk = self._allocate(len(group))
            self._chunks.append(chunk)
            for row, key in enumerate(group):
                self._index[key] = chunk[row]

    def _allocate(self, rows: int) -> torch.Tensor:
        shape = (rows, self.spec.numel)
        if self.pinned:
            try:
                return torch.zeros(shape, dtype=self.spec.dtype, pin_memory=True)
            except RuntimeError as err:
                # Pinned memory is a limited OS resource (ulimit -l, containers); run slower rather than fail.
                logger.warning(
                    "pinning %d bytes failed (%s); falling back to pageable memory", rows * self.spec.nbytes, err
                )
                self.pinned = False
                self.pin_reason = f"pageable: pinning failed ({err})"
        return torch.zeros(shape, dtype=self.spec.dtype)

    def write(self, key: Key, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fill one expert from its named tensors (any dtype; cast to the store's)."""
        views = self.spec.views(self._index[key])
        for name, view in views.items():
            view.copy_(tensors[name])

    def views(self, key: Key) -> dict[str, torch.Tensor]:
        return self.spec.views(self._index[key])

    def __getitem__(self, key: Key) -> torch.Tensor:
        return self._index[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._chunks)

    def close(self) -> None:
        """Release every buffer (pinned memory included)."""
        self._index.clear()
        self._chunks.clear()
