"""Compressed experts: how an expert is stored in the host store and the device slots, and
turned back into the model's dtype just before its kernel runs.

At batch-1 decode every lane an offloaded expert touches costs its bytes (the link, host DRAM
on the host lane, the device slot), so the store and the slots hold the compressed bytes and
the link moves them. The kernel is still the model's own: a layer's routed experts are decoded
into the pool's working buffer (device) or a host buffer (host lane), in the model's dtype,
and the stock kernel runs on them. Why decode rather than a packed kernel:
- exactness: the reference for a compressed model is the same model with the same decoded
  experts all resident (`compress_experts`); decoding with one function everywhere makes the
  offloaded model compute exactly that, on every architecture, with every kernel;
- the packed kernels torch ships (`_weight_int4pack_mm`, `_weight_int8pack_mm`) are plain
  matmuls: the model's expert arithmetic (gating, activations, biases, clamps) would have to
  be rewritten per architecture. `scripts/bench_compression.py` measures both on this machine.
  The one exception: on the host lane of a half-precision model, int8 experts are read as
  stored by torch's int8 kernel around the module's own gating (host_kernels.py), 13x faster.

Formats (`experts_dtype`):
- "bf16" (or "fp16"/"fp32"): a plain cast;
- "int8": symmetric, one fp32 scale per row of the last dimension (per channel);
- "int4": asymmetric, groups of `INT4_GROUP` along the last dimension, fp16 scale and minimum
  per group, two values per byte;
- "auto": the checkpoint's own format (the model's dtype, or a native quantized format).
Parameters with fewer than two dimensions per expert (biases) stay in the model's dtype.

A `Codec` lays an expert's parts out as bytes in one flat uint8 row (`Codec.stored`, an
`ExpertSpec` of uint8 parts), so the store, the pool, the loader and the cache handle a
compressed expert exactly like a plain one: a row of `stored.nbytes` bytes.

Two decode paths give the same values. The host decodes one expert at a time through fp32
scratch (`ParamFormat.decode`: cache-friendly, vectorised on a CPU). The device decodes a whole
wave of experts at once (`ParamFormat.decode_batch`: a few ops per parameter whatever the
number of experts, their temporaries carved from the pool's preallocated `Scratch`), since
on CUDA every op is a kernel launch: per expert and per part, Qwen3-30B-A3B in int4 took
about 4,000 launches per token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

from ..errors import ConfigError
from .dtypes import EXPERTS_DTYPES
from .layout import ExpertSpec

_CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Group size for int4. On the demo every size from 32 to 128 keeps the held-out loss within 0.05%
# (the bar is 3%), so 64 was chosen on weight error: 0.078 / 0.090 / 0.100 relative RMS at
# 32 / 64 / 128 for +11% / 0 / -6% bytes (docs/benchmarks.md, section 8).
INT4_GROUP = 64
# Decode at most this many elements at once: bounds the fp32 scratch (`_scratch`; a Mixtral
# expert matrix is 58M values, 235 MB in fp32) at a few launches more per expert.
_DECODE_ELEMS = 1 << 24
# The device decode's scratch (`SlotPool.scratch`): at most this many bytes, preallocated with
# the pool; a wave whose temporaries need more is decoded in row chunks that fit.
DECODE_SCRATCH_BYTES = 64 << 20
_ALIGN = 256  # byte alignment of each temporary carved from the scratch


class ParamFormat:
    """How one parameter of one expert is stored: named parts, each a tensor of fixed shape
    and dtype, and the function that rebuilds the parameter from them."""

    name = "raw"
    # Memory bytes decoding moves per value, beyond reading the stored bytes and writing and
    # re-reading the decoded copy (what the placement and the simulator charge a decoding call).
    # Host: the fp32 scratch path, from its measured time on one core (scripts/bench_compression.py,
    # at ~10 GB/s: int8 into bf16 3.6 ms, int4 10.1 ms for 7.3M values; the native formats are
    # taken as int4). Device: the batched path (`decode_batch`), counted from its ops, not yet
    # timed on a GPU (scripts/gpu_check.py's decode check times a wave): int4 writes and reads
    # its nibbles (2) and its scales; MXFP4 and FP8 count their own (native.py). A fused
    # dequantizing matmul would move none of it (docs/benchmarks.md, section 8).
    host_decode_bytes_per_value = 14
    device_decode_bytes_per_value = 3
    # Bytes of device scratch per decoded value `decode_batch` needs for its temporaries.
    scratch_bytes_per_value = 0.0

    def parts(self, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, parts: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        """Write one expert's parameter into `out` (its shape, the model's dtype) from `parts`."""
        raise NotImplementedError

    def decode_batch(self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, scratch: Scratch) -> None:
        """Write `n` experts' parameter into `out` `[n, *shape]` from `parts` `[n, *part shape]`,
        in a few ops whatever `n` (the device path). `out` is a strided view of the working
        buffer (its last dimension contiguous). Same values as `decode` per expert."""
        for i in range(out.shape[0]):
            self.decode({k: v[i] for k, v in parts.items()}, out[i])


class Cast(ParamFormat):
    host_decode_bytes_per_value = device_decode_bytes_per_value = 0  # one pass: the decoded copy's write

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.name = str(dtype).removeprefix("torch.")

    def parts(self, shape, dtype):
        return {"w": (shape, self.dtype)}

    def encode(self, w):
        return {"w": w.to(self.dtype)}

    def decode(self, parts, out):
        out.copy_(parts["w"])

    def decode_batch(self, parts, out, scratch):
        out.copy_(parts["w"])


class Int8(ParamFormat):
    """Symmetric per-channel int8: w = q * scale, one scale per row of the last dimension."""

    name = "int8"
    host_decode_bytes_per_value = 5
    device_decode_bytes_per_value = 0

    def parts(self, shape, dtype):
        return {"q": (shape, torch.int8), "scale": ((*shape[:-1], 1), torch.float32)}

    def encode(self, w):
        w = w.float()
        scale = w.abs().amax(dim=-1, keepdim=True) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
        return {"q": q, "scale": scale}

    def decode(self, parts, out):
        q, scale, o = _rows(parts["q"]), _rows(parts["scale"]), _rows(out)
        if _single_pass(o.device):  # q * scale in fp32, rounded once into the output
            torch.mul(q, scale, out=o)
            return
        for sl in _row_chunks(o.shape[0], o.shape[1]):
            rows = q[sl].shape[0]
            # fp32 arithmetic (q * scale, one rounding), in place in fp32 output or in scratch.
            f = o[sl] if o.dtype == torch.float32 else _scratch(o.device, "f32", rows * o.shape[1]).view(rows, -1)
            f.copy_(q[sl]).mul_(scale[sl])
            if o.dtype != torch.float32:
                o[sl].copy_(f)

    def decode_batch(self, parts, out, scratch):
        # q * scale in fp32 (int8 x fp32 promotes to fp32), rounded once into the output: what
        # the host's scratch path computes. One op for every expert of the wave.
        torch.mul(parts["q"], parts["scale"], out=out)


class Int4(ParamFormat):
    """Asymmetric group-wise int4 along the last dimension (K), in the form torch's CPU int4
    kernel computes: w = (q - 8) * scale + zero, q in 0..15, one scale and zero per group,
    two values per byte. Parts: `q` (the codes) and `sz` `[groups, rows, 2]` (scale, zero),
    exactly the `qScaleAndZeros` operand of `torch._weight_int4pack_mm_for_cpu`.

    Layout of `q`, chosen once per parameter (`block`) and recorded with a quantized copy:
    - block B > 0 (a bf16 model, rows a multiple of B, K a multiple of a group the kernel takes):
      the layout `torch._convert_weight_to_int4pack_for_cpu` writes on this machine (B = 64 with
      AVX-512, 32 with AVX2, `torch_int4_block`): per block of B rows, `[K, B/2]` bytes whose low
      nibbles are rows 0..B/2-1 and high nibbles rows B/2..B-1. The host lane's kernel reads these
      bytes as stored; the device decodes the same bytes (one transpose more than for `0`).
    - 0: pairs along K (low nibble first); a K that is not a multiple of the group is padded in
      the store and cut off when decoding.
    `sz` is in bf16 for a bf16 model (the kernel's dtype), fp16 otherwise."""

    name = "int4"

    def __init__(self, group: int | None = None, block: int = 0, sz_dtype: torch.dtype = torch.float16):
        # Read at construction, not bound at import: scripts/compression_quality.py measures
        # other group sizes by setting `compression.INT4_GROUP`.
        group = INT4_GROUP if group is None else group
        if group % 2:
            raise ConfigError(f"int4 group size {group} must be even (two values per byte)")
        self.group, self.block, self.sz_dtype = group, block, sz_dtype

    @property
    def layout(self) -> str:
        return f"block{self.block}" if self.block else "k-pairs"

    def _groups(self, shape):
        return -(-shape[-1] // self.group)

    def kernel_layout(self, shape) -> bool:
        """Whether parameters of `shape` are stored in the layout torch's CPU int4 kernel reads."""
        return self.block > 0 and self.sz_dtype == torch.bfloat16

    def parts(self, shape, dtype):
        groups, rows = self._groups(shape), math.prod(shape[:-1])
        return {
            "q": ((*shape[:-1], groups * self.group // 2), torch.uint8),
            "sz": ((groups, rows, 2), self.sz_dtype),
        }

    def encode(self, w):
        shape, groups = w.shape, self._groups(w.shape)
        w = w.float().reshape(-1, shape[-1])
        pad = groups * self.group - shape[-1]
        if pad:
            w = torch.nn.functional.pad(w, (0, pad), value=float(w.flatten()[0]) if w.numel() else 0.0)
        g = w.reshape(w.shape[0], groups, self.group)
        low, high = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        # Scale and zero are rounded to their stored dtype first and q computed against the
        # rounded values, so decoding (which only sees those) lands on the nearest level.
        scale = ((high - low) / 15).to(self.sz_dtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = (low + 8 * scale).to(self.sz_dtype).float()
        q = torch.round((g - (zero - 8 * scale)) / scale).clamp_(0, 15).to(torch.uint8).reshape(w.shape[0], -1)
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1)  # [groups, rows, 2]
        return {"q": _pack_int4(q, self.block).reshape(*shape[:-1], -1), "sz": sz.to(self.sz_dtype).contiguous()}

    def decode(self, parts, out):
        rows, padded = math.prod(out.shape[:-1]), parts["q"].numel() * 2 // math.prod(out.shape[:-1])
        q, o = parts["q"].reshape(rows, padded // 2), _rows(out)
        sz = parts["sz"]
        for sl in _row_chunks(rows, padded, self.block or 1):
            nrows = q[sl].shape[0]
            nibbles = _scratch(o.device, "u8", nrows * padded, torch.uint8).view(nrows, padded)
            _unpack_int4(q, sl, self.block, nibbles)
            # w = q * scale + (zero - 8 * scale): q * scale is exact in fp32 and zero - 8 * scale
            # too, so this rounds once, as the kernel's fused (q - 8) * scale + zero does.
            scale = sz[:, sl, 0].t().float().unsqueeze(-1)  # [rows, groups, 1]
            low = sz[:, sl, 1].t().float().unsqueeze(-1) - 8 * scale
            groups = (nrows, -1, self.group)
            if _single_pass(o.device) and padded == o.shape[1]:  # low + q * scale, into the output
                torch.addcmul(low, nibbles.view(groups), scale, out=o[sl].view(groups))
                continue
            # In fp32 in place: in the fp32 output itself when it has no padding, else in scratch.
            direct = o.dtype == torch.float32 and padded == o.shape[1]
            f = o[sl] if direct else _scratch(o.device, "f32", nrows * padded).view(nrows, -1)
            g = f.view(groups)
            g.copy_(nibbles.view(groups))
            g.mul_(scale).add_(low)
            if not direct:
                o[sl].copy_(f[:, : o.shape[1]])

    # the nibbles (one byte per value), fp32 scale and minimum per group; fp32 values when padded
    scratch_bytes_per_value = 1 + 8 / 64

    def decode_batch(self, parts, out, scratch):
        o = _flat_rows(out)  # [n, rows, K]
        n, rows, k = o.shape
        padded = parts["q"][0].numel() * 2 // rows
        if padded != k:  # K padded to the group (rare): the per-expert path cuts the padding off
            return super().decode_batch(parts, out, scratch)
        q = parts["q"].view(n, rows, k // 2)
        sz = parts["sz"]  # [n, groups, rows, 2]
        groups, block = k // self.group, self.block or 1
        # Row chunks of whole blocks whose temporaries (nibbles, fp32 scale and minimum) fit the scratch.
        step = max(block, int((scratch.capacity - 8 * _ALIGN) // (n * (k + 8 * groups))) // block * block)
        for start in range(0, rows, step):
            sl = slice(start, min(rows, start + step))
            nrows = sl.stop - start
            scratch.reset()
            nibbles = scratch.take((n, nrows, k), torch.uint8)
            packed = q[:, sl]
            if self.block:  # per block of B rows, [K, B/2] bytes: low nibbles rows 0..B/2-1, high B/2..B-1
                packed = packed.reshape(n, nrows // block, k, block // 2)
                halves = nibbles.view(n, nrows // block, 2, block // 2, k)
                torch.bitwise_and(packed, 15, out=halves[:, :, 0].transpose(-1, -2))
                torch.bitwise_right_shift(packed, 4, out=halves[:, :, 1].transpose(-1, -2))
            else:  # pairs along K, low nibble first
                pairs = nibbles.view(n, nrows, k // 2, 2)
                torch.bitwise_and(packed, 15, out=pairs[..., 0])
                torch.bitwise_right_shift(packed, 4, out=pairs[..., 1])
            # As `decode`'s single pass: w = (zero - 8 * scale) + q * scale, in fp32, rounded once.
            scale = scratch.take((n, nrows, groups, 1), torch.float32)
            low = scratch.take((n, nrows, groups, 1), torch.float32)
            scale.copy_(sz[:, :, sl, 0].transpose(1, 2).unsqueeze(-1))
            low.copy_(sz[:, :, sl, 1].transpose(1, 2).unsqueeze(-1)).sub_(scale, alpha=8)
            shape = (n, nrows, groups, self.group)
            torch.addcmul(low, nibbles.view(shape), scale, out=o[:, sl].view(shape))


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    """`[n, *lead, last]` as `[n, rows, last]` without a copy (the expert dimension may be
    strided: a wave's experts are rows of the working buffer)."""
    return t.view(t.shape[0], -1, t.shape[-1])


class Scratch:
    """Temporaries of the batched decode, carved in turn from one preallocated byte buffer (the
    pool's), so the device decode allocates nothing per token. `reset` before each chunk: a
    chunk's temporaries are dead once its last op is enqueued (one stream, in order). Without a
    buffer (a test forcing the device path on the CPU) each temporary is a new tensor."""

    def __init__(self, buffer: torch.Tensor | None = None, device: torch.device | None = None):
        self.buffer = buffer
        self.device = buffer.device if buffer is not None else device
        self.capacity = buffer.numel() if buffer is not None else DECODE_SCRATCH_BYTES
        self.used = 0
        self.overflows = 0  # temporaries that did not fit and were allocated (a row wider than the buffer)

    def reset(self) -> None:
        self.used = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        start = -(-self.used // _ALIGN) * _ALIGN
        if self.buffer is None or start + nbytes > self.capacity:
            self.overflows += self.buffer is not None
            return torch.empty(shape, dtype=dtype, device=self.device)
        self.used = start + nbytes
        return self.buffer[start : start + nbytes].view(dtype).view(shape)

    def row_chunks(self, rows: int, bytes_per_row: float):
        """Row slices whose temporaries (`bytes_per_row` each, plus alignment) fit the buffer."""
        step = max(1, int((self.capacity - 8 * _ALIGN) // max(1.0, bytes_per_row)))
        for start in range(0, rows, step):
            yield slice(start, start + step)


def scratch_bytes(codec: Codec, experts: int) -> int:
    """Device scratch for decoding `experts` experts at once (capped at `DECODE_SCRATCH_BYTES`:
    a larger wave is decoded in row chunks), 0 for plain experts."""
    if codec.identity:
        return 0
    need = max(
        math.prod(shape) * codec.formats[name].scratch_bytes_per_value * 1.25  # padding, alignment
        for name, shape in zip(codec.spec.names, codec.spec.shapes)
    )
    return min(DECODE_SCRATCH_BYTES, int(experts * need) + 16 * _ALIGN)


def release_scratch() -> None:
    """Drop the host decode's reused buffers (`_scratch`), as detach does: up to 64 MiB each."""
    _SCRATCH.clear()


def _pack_int4(q: torch.Tensor, block: int) -> torch.Tensor:
    """Codes `q` [rows, K] (0..15) as bytes: pairs along K (`block` 0) or torch's CPU block layout."""
    if not block:
        return q[..., 0::2] | (q[..., 1::2] << 4)
    rows, k = q.shape
    q = q.reshape(rows // block, 2, block // 2, k)
    return (q[:, 0] | (q[:, 1] << 4)).transpose(1, 2).contiguous().reshape(rows, k // 2)


def _unpack_int4(q: torch.Tensor, sl: slice, block: int, out: torch.Tensor) -> None:
    """Rows `sl` of the packed codes `q` [rows, K/2] into `out` [len(sl), K], one code per byte."""
    if not block:
        packed, pairs = q[sl], out.view(out.shape[0], -1, 2)
        torch.bitwise_and(packed, 15, out=pairs[..., 0])
        torch.bitwise_right_shift(packed, 4, out=pairs[..., 1])
        return
    # Row chunks cover whole blocks (`_row_chunks` is asked for multiples below): [blocks, K, B/2].
    start = sl.start or 0
    blocks = out.shape[0] // block
    k = out.shape[1]
    packed = q[start : start + blocks * block].reshape(blocks, k, block // 2)
    halves = out.view(blocks, 2, block // 2, k)
    torch.bitwise_and(packed, 15, out=halves[:, 0].transpose(1, 2))
    torch.bitwise_right_shift(packed, 4, out=halves[:, 1].transpose(1, 2))


@functools.cache
def torch_int4_block() -> int:
    """The block of rows torch's CPU int4 kernel packs its weights in on this machine (64 with
    AVX-512, 32 with AVX2), found by packing a probe with `torch._convert_weight_to_int4pack_for_cpu`
    and comparing with `_pack_int4`; 0 when it packs otherwise or has no such op (then int4 is
    stored in pairs along K and the host lane decodes it)."""
    convert = getattr(torch, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return 0
    probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = convert(probe, 1)
    except RuntimeError:
        return 0
    for block in (64, 32):
        if torch.equal(packed.reshape(-1), _pack_int4(probe.to(torch.uint8), block).reshape(-1)):
            return block
    return 0


def int4_block(shape, dtype: torch.dtype, group: int) -> int:
    """The kernel's block for an int4 parameter of `shape` in a model of `dtype`, or 0 where the
    kernel cannot read it (not bf16, rows not a multiple of the block, K not whole groups)."""
    block = torch_int4_block() if dtype == torch.bfloat16 and len(shape) == 2 else 0
    rows, k = shape[0] if len(shape) == 2 else 0, shape[-1]
    if not block or rows % block or k % group or group not in (32, 64, 128, 256):
        return 0
    return block


def _row_chunks(rows: int, per_row: int, multiple: int = 1):
    """Row slices that keep each decode step under `_DECODE_ELEMS` values (each a multiple of
    `multiple` rows: int4's block layout decodes whole blocks)."""
    step = max(multiple, _DECODE_ELEMS // max(1, per_row) // multiple * multiple)
    for start in range(0, rows, step):
        yield slice(start, start + step)


def _single_pass(device: torch.device) -> bool:
    """Decode in one mixed-dtype op per format (int8 -> output; int4 nibbles -> output) where that
    is fastest: on CUDA, where the cast on load is free and every extra pass costs HBM traffic.
    On the CPU those mixed-dtype kernels are not vectorised (int8 into bf16: 30 ms against 3.6 ms
    for the scratch path), so the host keeps the fp32 scratch path. Both give the same values on
    the CPU (tested by forcing this path there); on CUDA a fused multiply-add may round int4's
    last bit differently, within the model dtype's rounding."""
    return device.type == "cuda"


_SCRATCH: dict[tuple[str, str], torch.Tensor] = {}


def _scratch(device: torch.device, name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reused flat buffer of at least `numel` values, per device: decoding allocates nothing per
    call (fresh multi-MB temporaries cost a page fault per 4 KiB on the host, more than the
    arithmetic). At most `_DECODE_ELEMS` values each (64 MiB in fp32), as decode chunks."""
    key = (str(device), name)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as rows of its last dimension: a view (never a copy, which would drop writes to `out`);
    `Codec.decode` hands the formats one expert at a time, whose parts and outputs are contiguous."""
    return t.view(-1, t.shape[-1])


class Codec:
    """The stored layout of one expert for one `experts_dtype`, over the model's `spec`."""

    def __init__(self, spec: ExpertSpec, name: str, formats: Mapping[str, ParamFormat]):
        self.spec = spec
        self.name = name
        self.formats = dict(formats)
        self.identity = all(isinstance(f, Cast) and f.dtype == spec.dtype for f in self.formats.values())
        if self.identity:
            self.stored = spec
            self._parts = {}
            return
        names, shapes, parts = [], [], {}
        for pname, shape in zip(spec.names, spec.shapes):
            for part, (pshape, pdtype) in self.formats[pname].parts(shape, spec.dtype).items():
                names.append(f"{pname}.{part}")
                shapes.append((math.prod(pshape) * pdtype.itemsize,))
                parts[f"{pname}.{part}"] = (pname, part, pshape, pdtype)
        self.stored = ExpertSpec(names=tuple(names), shapes=tuple(shapes), dtype=torch.uint8)
        self._parts = parts

    @property
    def nbytes(self) -> int:
        """Bytes of one expert as stored, moved over the link and held in a slot."""
        return self.stored.nbytes

    @property
    def host_bytes(self) -> int:
        """DRAM bytes one host-lane call on this expert touches when it is decoded first: the
        stored bytes, the decode's temporaries, and the decoded copy written and then read by the
        kernel. So a compressed expert is cheaper on the link but dearer on the host lane than a
        plain one, unless a packed kernel reads it as stored (host_kernels.py)."""
        if self.identity:
            return self.nbytes
        return self._decoding_bytes("host_decode_bytes_per_value")

    @property
    def device_bytes(self) -> int:
        """The same for one device call: the stored bytes read from the slot, the single-pass
        decode's extra traffic, and the decoded copy written and read by the stock kernel."""
        return self._decoding_bytes("device_decode_bytes_per_value")

    def _decoding_bytes(self, per_value: str) -> int:
        if self.identity:
            return self.nbytes
        traffic = sum(
            math.prod(shape) * getattr(self.formats[name], per_value)
            for name, shape in zip(self.spec.names, self.spec.shapes)
        )
        return self.nbytes + traffic + 2 * self.spec.nbytes

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One expert's parameters (the model's names and shapes; all, or some of them) as their
        stored parts, each a flat uint8 tensor (`stored`'s names), or unchanged for the identity codec."""
        if self.identity:
            return dict(tensors)
        out = {}
        for pname in (name for name in self.spec.names if name in tensors):
            for part, tensor in self.formats[pname].encode(tensors[pname]).items():
                out[f"{pname}.{part}"] = tensor.contiguous().reshape(-1).view(torch.uint8)
        return out

    def typed(self, rows: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Views of stored rows `[..., stored.numel]` as each parameter's typed parts."""
        lead = rows.shape[:-1]
        typed: dict[str, dict[str, torch.Tensor]] = {}
        for key, view in self.stored.views(rows).items():
            pname, part, pshape, pdtype = self._parts[key]
            typed.setdefault(pname, {})[part] = view.view(pdtype).view(*lead, *pshape)
        return typed

    def decode(self, rows: torch.Tensor, out: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """Decode stored rows `[n, stored.numel]` into `out` `[n, spec.numel]` (the model's dtype).
        On the device, every expert at once per parameter (`decode_batch`), with temporaries
        from `scratch` (the pool's; None: new tensors); on the host one expert at a time."""
        if self.identity:
            return out.copy_(rows)
        views = self.spec.views(out)
        batched = _single_pass(out.device)
        scratch = scratch if scratch is not None else Scratch(device=out.device)
        for pname, parts in self.typed(rows).items():
            if batched:
                self.formats[pname].decode_batch(parts, views[pname], scratch)
                continue
            for i in range(rows.shape[0]):  # one expert at a time: its views are contiguous
                self.formats[pname].decode({k: v[i] for k, v in parts.items()}, views[pname][i])
        return out

    def expand(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """One stored expert decoded into new tensors, by parameter name (the model's shapes)."""
        if self.identity:
            return self.spec.views(row)
        out = torch.empty(1, self.spec.numel, dtype=self.spec.dtype, device=row.device)
        self.decode(row.unsqueeze(0), out)
        return {name: view[0] for name, view in self.spec.views(out).items()}

    def describe(self) -> str:
        kinds = sorted({f.name for f in self.formats.values()})
        return self.name if len(kinds) <= 1 else f"{self.name} ({', '.join(kinds)})"


def make_codec(spec: ExpertSpec, experts_dtype: str = "auto", native: Mapping[str, ParamFormat] | None = None) -> Codec:
    """The codec for `experts_dtype` over `spec`. `native`: formats the checkpoint stores its
    experts in (used by "auto"), by parameter name."""
    if experts_dtype not in EXPERTS_DTYPES:
        raise ConfigError(f"experts_dtype={experts_dtype!r} is not one of {', '.join(EXPERTS_DTYPES)}")
    formats: dict[str, ParamFormat] = {}
    for pname, shape in zip(spec.names, spec.shapes):
        if experts_dtype == "auto":
            fmt = (native or {}).get(pname) or Cast(spec.dtype)
        elif len(shape) < 2:
            fmt = Cast(spec.dtype)  # biases: a few KiB, kept exact
        elif experts_dtype in _CASTS:
            fmt = Cast(_CASTS[experts_dtype])
        elif experts_dtype == "int8":
            fmt = Int8()
        else:
            group = INT4_GROUP
            sz = torch.bfloat16 if spec.dtype == torch.bfloat16 else torch.float16
            fmt = Int4(group, int4_block(shape, spec.dtype, group), sz)
        formats[pname] = fmt
    name = experts_dtype if experts_dtype != "auto" else _auto_name(spec, formats)
    return Codec(spec, name, formats)


def _auto_name(spec: ExpertSpec, formats: Mapping[str, ParamFormat]) -> str:
    kinds = [f.name for f in formats.values() if not isinstance(f, Cast)]
    return kinds[0] if kinds else str(spec.dtype).removeprefix("torch.")


def round_trip(codec: Codec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the runtime computes with for an expert: its parameters encoded then decoded."""
    if codec.identity:
        return dict(tensors)
    row = torch.empty(codec.stored.numel, dtype=torch.uint8)
    encoded = codec.encode(tensors)
    for name, view in codec.stored.views(row).items():
        view.copy_(encoded[name])
    return codec.expand(row)


def compress_experts(model, experts_dtype: str) -> object:
    """The reference for a compressed model: replace every expert of `model` (in place) by what
    the runtime computes with for `experts_dtype`, all resident. An offloaded model with the same
    `experts_dtype` generates the same tokens as this one. Returns the model."""
    from .layout import find_moe_layers, spec_of

    layers = find_moe_layers(model)
    codec = make_codec(spec_of(layers), experts_dtype)
    with torch.no_grad():
        for layer in layers:
            params = dict(layer.experts.named_parameters(recurse=False))
            for e in range(layer.num_experts):
                decoded = round_trip(codec, {n: p[e].detach().cpu() for n, p in params.items()})
                for name, param in params.items():
                    param[e].copy_(decoded[name])
    return model
