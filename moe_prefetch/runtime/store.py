"""The host expert store: the master copy of every expert, one flat buffer each.

Memory. Experts live in chunks: anonymous memory mappings, each holding whole experts of one
layer and well under 4 GiB (pinning one huge block is slow and can fail on some drivers).
Not `torch.zeros(pin_memory=True)`: PyTorch's caching host allocator rounds each block up to a
power of two (up to 2x for 342 MiB-1 GiB chunks), zero-fills bytes we overwrite anyway, and
keeps the blocks cached after we let go. A mapping is sized to the page, touches no page until
it is written (so a layer's pages appear only as that layer moves in), and goes back to the OS
once the store is closed and the last view of it is dropped.

Pinning. On CUDA each chunk is page-locked with cudaHostRegister once its layer is written, so
the copy engine can DMA from it and copies overlap compute; registering touches every page, so
doing it up front would hold the whole store while the model still holds its own copy. `close`
unregisters. If registering fails we keep pageable memory and say so (`pin_reason`, a warning).

    HostStore(spec, keys, pin)   address space only, nothing resident
    store.absorb(layers)         attach: per layer, write its experts, free the model's copy, pin
    store.fill(layer_idx, ...)   load: per layer, write experts read from the checkpoint, pin
    store.fill_stored(...)       load: the same with parts already encoded (a quantized copy)
    store.close()                unpin; memory returns when the last view is dropped

Compressed experts (`compression.Codec`): each row holds the expert's stored bytes, not its
parameters; `write` encodes, `expert` and `stacked` decode. Identity codec: rows are parameters.

Evictions never write back: the device slots are read-only copies.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import psutil
import torch

from ..errors import HostMemoryError
from ..experts.compression import Codec, make_codec
from ..experts.layout import ExpertSpec, MoELayer
from .cache import Key

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 30  # 1 GiB
PAGE = mmap.PAGESIZE
_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, whichever device holds the slots


def check_host_memory(needed: int) -> None:
    """Refuse up front when `needed` more bytes of host memory cannot fit in available RAM."""
    available = psutil.virtual_memory().available
    if needed > available:
        raise HostMemoryError(
            f"the host expert store needs {needed / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB of RAM "
            "is available; free memory, use a machine with more RAM, or a smaller dtype"
        )


@dataclass
class _Chunk:
    layer_idx: int
    expert_ids: list[int]  # row i holds expert expert_ids[i]
    rows: torch.Tensor  # [experts, spec.numel], a view of the whole mapping
    nbytes: int  # the mapping's size, whole pages
    registered: bool = False

    @property
    def first(self) -> int:
        return self.expert_ids[0]

    @property
    def consecutive(self) -> bool:
        """Row i holds expert first + i: the rows are a `[count, ...]` slice of the layer's experts."""
        return self.expert_ids == list(range(self.first, self.first + len(self.expert_ids)))


class HostStore(Mapping[Key, torch.Tensor]):
    """Read-only mapping `(layer_idx, expert_id) -> flat host row of the codec's stored layout`
    (`spec.numel` parameters for the identity codec, `codec.stored.numel` bytes otherwise)."""

    def __init__(self, spec: ExpertSpec, keys: Iterable[Key], pin: bool, codec: Codec | None = None):
        self.spec = spec  # the model's parameters
        self.codec = codec or make_codec(spec)
        self.layout = self.codec.stored  # what a row holds
        self.pin_reason = "pinned: CUDA device, so copies can be asynchronous" if pin else "pageable: CPU device"
        self._pin = pin
        self._pin_failed = False
        self._chunks: list[_Chunk] = []
        self._index: dict[Key, torch.Tensor] = {}
        by_layer: dict[int, list[int]] = {}
        for layer_idx, expert_id in keys:
            by_layer.setdefault(layer_idx, []).append(expert_id)
        per_chunk = max(1, CHUNK_BYTES // self.layout.nbytes)
        for layer_idx, expert_ids in by_layer.items():
            for start in range(0, len(expert_ids), per_chunk):
                group = expert_ids[start : start + per_chunk]
                chunk = self._map(layer_idx, group)
                self._chunks.append(chunk)
                for row, expert_id in enumerate(group):
                    self._index[(layer_idx, expert_id)] = chunk.rows[row]
        # Pointers registered with CUDA. A store dropped without close() must still unregister
        # them before its mappings are unmapped: the finalizer runs before the chunks are freed.
        self._registered: list[int] = []
        self._finalizer = weakref.finalize(self, _unregister_all, self._registered)
        self._finalizer.atexit = False  # at exit the OS reclaims everything; CUDA may be torn down

    def _map(self, layer_idx: int, expert_ids: list[int]) -> _Chunk:
        rows = len(expert_ids)
        wanted = rows * self.layout.nbytes
        size = -(-wanted // PAGE) * PAGE
        try:
            if hasattr(mmap, "MAP_ANONYMOUS"):
                # Private anonymous pages: zero until written, page aligned, so two registered chunks
                # never share a page (CUDA refuses to register a page twice).
                buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                if hasattr(mmap, "MADV_HUGEPAGE"):
                    # 2 MiB pages: 512x fewer page faults while filling (about 4x faster) and fewer TLB misses
                    # when the host reads experts; the kernel falls back to 4 KiB pages if it has none.
                    buffer.madvise(mmap.MADV_HUGEPAGE)
                raw = torch.frombuffer(buffer, dtype=torch.uint8)
            else:  # no anonymous mmap (Windows): plain host memory, never pinned there anyway
                raw = torch.empty(size, dtype=torch.uint8)
        except (OSError, MemoryError, RuntimeError) as err:
            raise HostMemoryError(
                f"cannot reserve {size / 2**30:.2f} GiB of host memory for the expert store ({err}); "
                "free memory or use a machine with more RAM"
            ) from None
        return _Chunk(layer_idx, expert_ids, raw[:wanted].view(self.layout.dtype).view(rows, self.layout.numel), size)

    # -- filling ---------------------------------------------------------------------
    def write(self, key: Key, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fill one expert from its named parameters (any dtype): encoded by the codec."""
        self.write_stored(key, self.codec.encode(tensors))

    def write_stored(self, key: Key, parts: Mapping[str, torch.Tensor]) -> None:
        """Fill one expert with its already encoded parts, by `layout` name (a quantized copy or a
        checkpoint's native format): any dtype and shape, copied as bytes. Every part is needed."""
        self.update(key, {name: parts[name] for name in self.layout.names})

    def update(self, key: Key, parts: Mapping[str, torch.Tensor]) -> None:
        """Overwrite some of one expert's encoded parts (`codec.encode` of some of its parameters);
        the others keep their bytes. No copy from the expert's row may be in flight (the caller,
        `Runtime.replace_experts`, drains the loader first)."""
        views = self.layout.views(self._index[key])
        for name, part in parts.items():
            views[name].copy_(part if self.codec.identity else part.contiguous().reshape(-1).view(torch.uint8))

    def fill(self, layer_idx: int, experts: Iterable[tuple[int, Mapping[str, torch.Tensor]]]) -> None:
        """Write `(expert_id, named tensors)` for every expert of one layer, then pin the layer."""
        for expert_id, tensors in experts:
            self.write((layer_idx, expert_id), tensors)
        self._pin_layer(layer_idx)

    def fill_stored(self, layer_idx: int, experts: Iterable[tuple[int, Mapping[str, torch.Tensor]]]) -> None:
        """`fill` with parts already encoded (`write_stored`), then pin the layer."""
        for expert_id, parts in experts:
            self.write_stored((layer_idx, expert_id), parts)
        self._pin_layer(layer_idx)

    def absorb(self, layers: list[MoELayer]) -> None:
        """Move every expert out of the model into the store, one layer at a time.

        Each layer's experts are written, then the model's copy of that layer is freed, before the
        next layer: host memory peaks at the store plus one layer, not twice the experts. The
        parameters keep their shape and device (a zero-stride view of one element) so the caller
        can still read what to restore on detach; it empties them. If anything fails, the layers
        already moved get their experts back."""
        check_host_memory(self.absorb_peak_bytes(layers))
        moved: list[tuple[MoELayer, str, torch.nn.Parameter]] = []
        try:
            for layer in layers:
                params = dict(layer.experts.named_parameters(recurse=False))
                for chunk in self._chunks:
                    if chunk.layer_idx == layer.layer_idx:
                        self._copy_rows(chunk, params)
                self._pin_layer(layer.layer_idx)
                for name, param in params.items():
                    param.data = param.detach().new_empty(()).expand(param.shape)
                    moved.append((layer, name, param))
        except BaseException:
            for layer, name, param in moved:
                param.data = (
                    self.stacked(layer.layer_idx, name, layer.num_experts).to(param.device).reshape(param.shape)
                )
            raise

    def _copy_rows(self, chunk: _Chunk, params: Mapping[str, torch.Tensor]) -> None:
        """One copy per parameter for a chunk of consecutive experts, not one per expert: each
        copy call has a fixed cost (threads woken, page faults taken), paid 128x at 128 experts."""
        first, count = chunk.first, len(chunk.expert_ids)
        if not chunk.consecutive or not self.codec.identity:
            for expert_id in chunk.expert_ids:
                self.write((chunk.layer_idx, expert_id), {n: p.detach()[expert_id] for n, p in params.items()})
            return
        for name, view in self.spec.views(chunk.rows).items():
            view.copy_(params[name].detach()[first : first + count].reshape(view.shape))

    def absorb_peak_bytes(self, layers: list[MoELayer]) -> int:
        """Host bytes `absorb` adds at its peak: the store so far, less the model's host copies
        already freed. Experts on a device free no host memory."""
        held = peak = 0
        for layer in layers:
            held += sum(c.nbytes for c in self._chunks if c.layer_idx == layer.layer_idx)
            peak = max(peak, held)
            held -= sum(p.nbytes for p in layer.experts.parameters(recurse=False) if p.device.type == "cpu")
        return peak

    def stacked(self, layer_idx: int, name: str, num_experts: int) -> torch.Tensor:
        """One parameter of one layer as the model holds it: `[num_experts, *shape]`, a new tensor
        filled with one copy per chunk (not a stack of one copy per expert)."""
        out = torch.empty((num_experts, *self.spec.shapes[self.spec.names.index(name)]), dtype=self.spec.dtype)
        if not self.codec.identity:  # decoded one expert at a time
            for chunk in self._chunks:
                if chunk.layer_idx == layer_idx:
                    for row, expert_id in enumerate(chunk.expert_ids):
                        out[expert_id].copy_(self.codec.expand(chunk.rows[row])[name])
            return out
        for chunk in self._chunks:
            if chunk.layer_idx != layer_idx:
                continue
            view = self.spec.views(chunk.rows)[name]
            first, count = chunk.first, len(chunk.expert_ids)
            if chunk.consecutive:
                out[first : first + count].copy_(view)
            else:
                for row, expert_id in enumerate(chunk.expert_ids):
                    out[expert_id].copy_(view[row])
        return out

    def _pin_layer(self, layer_idx: int) -> None:
        if not self._pin or self._pin_failed:
            return
        for chunk in self._chunks:
            if chunk.layer_idx != layer_idx or chunk.registered:
                continue
            ptr = chunk.rows.data_ptr()
            try:
                _cuda_register(ptr, chunk.nbytes)
            except RuntimeError as err:
                # Pinned memory is a limited OS resource (ulimit -l, containers): run slower rather than fail.
                self._pin_failed = True
                self.pin_reason = f"pageable: pinning failed ({err})"
                logger.warning(
                    "pinning %.1f MiB of host memory failed (%s): the expert store stays pageable, so copies "
                    "to the device are slower and do not overlap compute; raise `ulimit -l` or the container's "
                    "locked-memory limit",
                    chunk.nbytes / 2**20,
                    err,
                )
                return
            chunk.registered = True
            self._registered.append(ptr)

    # -- reading ---------------------------------------------------------------------
    def spans(self, layer_idx: int) -> list[tuple[int, int, torch.Tensor | None]]:
        """Each chunk of one layer as (first expert, count, rows `[count, layout.numel]`), rows
        None where the chunk's experts are not consecutive ids."""
        out = []
        for chunk in self._chunks:
            if chunk.layer_idx != layer_idx:
                continue
            out.append((chunk.first, len(chunk.expert_ids), chunk.rows if chunk.consecutive else None))
        return out

    def expert(self, key: Key) -> dict[str, torch.Tensor]:
        """One expert's parameters by name, in the model's dtype and shapes: views of the store
        (identity codec) or a decoded copy."""
        return self.codec.expand(self._index[key])

    def __getitem__(self, key: Key) -> torch.Tensor:
        return self._index[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def pinned(self) -> bool:
        """Every chunk is page-locked: pinning was asked for, no registration failed, every layer is in."""
        return self._pin and not self._pin_failed and all(c.registered for c in self._chunks)

    @property
    def nbytes(self) -> int:
        """Bytes really allocated: every mapping, whole pages."""
        return sum(c.nbytes for c in self._chunks)

    def close(self) -> None:
        """Unpin and drop every buffer. The memory goes back to the OS once no view of it is left
        (the runtime keeps none after detach); copies from it must have finished."""
        self._finalizer()
        self._index.clear()
        self._chunks.clear()


def _cuda_register(ptr: int, nbytes: int) -> None:
    try:
        cudart = torch.cuda.cudart()
        code = int(cudart.cudaHostRegister(ptr, nbytes, _PORTABLE))
    except (AssertionError, RuntimeError, AttributeError) as err:  # no CUDA build, no driver
        raise RuntimeError(f"cudaHostRegister unavailable: {err}") from None
    if code != 0:
        _clear_cuda_error()
        raise RuntimeError(f"cudaHostRegister: {torch.cuda.CudaError(code)}")


def _cuda_unregister(ptr: int) -> None:
    code = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if code != 0:
        _clear_cuda_error()
        logger.warning("cudaHostUnregister failed: %s", torch.cuda.CudaError(code))


def _unregister_all(registered: list[int]) -> None:
    while registered:
        _cuda_unregister(registered.pop())


def _clear_cuda_error() -> None:
    """A failed runtime call stays the thread's "last CUDA error", and torch's check after its next
    kernel launch (cudaGetLastError) would raise it as that kernel's own. torch does not bind
    cudaGetLastError, so read it off from the libcudart already loaded (never load another)."""
    names = []
    try:
        with open("/proc/self/maps") as maps:
            names = sorted({line.split()[-1] for line in maps if "libcudart" in line})
    except OSError:
        pass
    for name in names or ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]:
        try:
            ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue
    logger.debug("could not clear the last CUDA error: no loaded libcudart found")
