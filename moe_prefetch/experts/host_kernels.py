"""The host lane's matmuls, one per stored format, on the stored bytes.

Each projection of an expert (`gate_up_proj` or `up_proj`, then `down_proj`) runs one kernel
chosen once per layer from how the expert is stored (`plan`):

  dense   the model's dtype as stored (bf16, fp16, fp32): `F.linear` on the store's own view,
          no conversion (a bf16 model keeps bf16 weights: `load` no longer builds fp32 on CPU)
  int8    symmetric per-channel int8 in a half-precision model: `torch._weight_int8pack_mm`
          reads the int8 weights and their scales as stored
  int4    group-wise int4 in a bf16 model, stored in the layout of torch's CPU int4 kernel
          (`compression.Int4`, laid out once when quantized): `torch._weight_int4pack_mm_for_cpu`
          reads the stored bytes, scales and zeros included
  mxfp4   GPT-OSS MXFP4 in a bf16/fp16 model (`native.MXFP4`, its `[out, in/32, 16]` blocks):
          row chunks of the weight decoded in the model's dtype by one table lookup per stored
          byte (the byte and its block's exponent index the two weights), then `F.linear`
  fp8     block-scaled FP8 in a bf16/fp16 model (`native.FP8Block`, whole blocks): row chunks
          decoded by one lookup per byte in a table per block (e4m3 value x the block's scale,
          rounded once), then `F.linear`
  decode  anything else (a compressed fp32 model, int4 in a layout the kernel does not read,
          transposed int8/int4, ragged FP8 blocks): decoded into a reused buffer in the model's
          dtype, then `dense`

Why not the stock kernel: `grouped_mm` on a CPU issues one matmul per group, empty experts
included (52% of a bf16 host-lane run, issue 19), and decoding int4 on every use cost 61% of
an int4 run. The expert's arithmetic stays the model's own (`host_lane.py` applies the module's
`_apply_gate` or `act_fn`, biases and post-expert norm as the stock kernel does); only the
matmuls change, so the lane matches the device lane within the model dtype's rounding (exactly,
up to summation order, in fp32). In fp32 the packed kernels gain little and decode + dense is
exact, so compressed fp32 models decode.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .compression import Cast, Codec, Int4, Int8
from .native import FP4_VALUES, MXFP4, FP8Block

KINDS = ("dense", "int8", "int4", "mxfp4", "fp8", "decode")
# What ran, in words (`Runtime.stats()["host_kernels"]`).
KERNEL_NAMES = {
    "dense": "F.linear on the stored weights",
    "int8": "torch._weight_int8pack_mm on the stored int8 bytes",
    "int4": "torch._weight_int4pack_mm_for_cpu on the stored int4 bytes",
    "mxfp4": "MXFP4 row chunks decoded in the model dtype (lookup table), F.linear per chunk",
    "fp8": "FP8 row chunks scaled in the model dtype, F.linear per chunk",
    "decode": "decode into the model dtype, then F.linear",
}


INT8_PACK_K = 16  # torch._weight_int8pack_mm's K granularity on CPU (other K: a segfault)


def projections(module) -> tuple[str, str]:
    """The up and down projection parameters of an experts module, in call order."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"), "down_proj"


def kind_of(codec: Codec, name: str, module) -> str:
    """How the host lane runs parameter `name` of `module`'s experts, stored with `codec`."""
    fmt, dtype = codec.formats[name], codec.spec.dtype
    transposed = getattr(module, "is_transposed", False)
    if isinstance(fmt, Cast) and fmt.dtype == dtype:
        return "dense"
    half = dtype in (torch.bfloat16, torch.float16)
    shape = codec.spec.shapes[codec.spec.names.index(name)]
    if isinstance(fmt, MXFP4) and half and transposed:  # GPT-OSS: blocks are the [out, in] rows
        return "mxfp4"
    if (
        isinstance(fmt, FP8Block)
        and half
        and not transposed
        and not (shape[0] % fmt.block[0] or shape[1] % fmt.block[1])
    ):
        return "fp8"
    if transposed:  # packed kernels want [out, in] with scales per output channel / input group
        return "decode"
    if isinstance(fmt, Int8) and dtype in (torch.bfloat16, torch.float16) and hasattr(torch, "_weight_int8pack_mm"):
        # torch's kernel crashes the process (SIGSEGV, torch 2.13 CPU) when K is not a multiple
        # of 16; the compiled kernel takes any K (tests/test_cpu_kernels.py)
        if shape[1] % INT8_PACK_K == 0 or cpu_kernels.status().available:
            return "int8"
    if isinstance(fmt, Int4) and dtype == torch.bfloat16 and fmt.kernel_layout(shape):
        return "int4"
    return "decode"


def plan(codec: Codec, module) -> dict[str, str]:
    """Kernel kind per parameter of `module`'s experts (projections and their biases)."""
    return {name: kind_of(codec, name, module) for name in codec.spec.names}


# What one stored byte costs each kernel, in bytes of a bf16 expert read at the host profile's
# `expert_bytes_per_s` (CPU time per expert, interleaved, one thread, a 1024 x 512 SwiGLU expert
# cycled through 100 copies on the workplace's 2-core EPYC: bf16 308 us for 3.15 MB, int8 293 us
# for 1.58 MB, int4 128 us for 0.88 MB). The packed kernels dequantize in registers, so they are
# bound by arithmetic before DRAM: int8 reads half the bytes in the same time as bf16.
# `moe-prefetch calibrate` measures these rates on the machine at hand (`format_bytes_per_s`).
# MXFP4 and FP8 decode a row chunk by one table lookup per byte, then `F.linear`
# (`scripts/bench_host_kernels.py`, same machine, one thread, two runs: mxfp4 26.7 and 31.5, fp8
# 19.1 and 22.9 bf16 bytes per stored byte, e.g. mxfp4 1583 us for 0.84 MB beside bf16 189 us
# for 3.15 MB): the lookups, not the bytes, bound them.
KERNEL_BYTE_COST = {"dense": 1.0, "int8": 1.9, "int4": 1.5, "mxfp4": 29.0, "fp8": 21.0}
# The compiled kernels where they run (cpu_kernels.py; scripts/bench_cpu_kernels.py, one thread,
# CPU time against bf16 in the same run): int8 reads at near bf16's rate per byte.
COMPILED_BYTE_COST = {"int8": 1.2, "int4": 1.5}


def host_bytes(codec: Codec, module) -> int:
    """DRAM-equivalent bytes one host-lane call on an expert of `module` costs, for the placement
    and the simulator: each parameter's stored bytes at its kernel's cost per byte, or, when any
    parameter is decoded first, the decode's traffic too (`Codec.host_bytes`)."""
    kinds = plan(codec, module)
    if not reads_stored(kinds):
        return codec.host_bytes
    if codec.identity:
        return codec.nbytes
    stored: dict[str, int] = {}
    for name, shape in zip(codec.stored.names, codec.stored.shapes):
        param = name.split(".")[0]
        stored[param] = stored.get(param, 0) + shape[0]  # uint8 parts: bytes
    cost = KERNEL_BYTE_COST | (COMPILED_BYTE_COST if cpu_kernels.status().available else {})
    return round(sum(n * cost[kinds[p]] for p, n in stored.items()))


def reads_stored(kinds: Mapping[str, str]) -> bool:
    """Whether the host lane reads the stored bytes only (no decoded copy written and re-read)."""
    return all(kind != "decode" for kind in kinds.values())


class Projection:
    """One parameter's matmul on the host lane: `x [n, in] -> [n, out]` for one expert's stored
    parts (a weight tensor for `dense`, a dict of typed parts otherwise)."""

    def __init__(self, codec: Codec, name: str, kind: str, transposed: bool):
        self.name, self.kind, self.transposed = name, kind, transposed
        self.format = codec.formats[name]
        self.shape = codec.spec.shapes[codec.spec.names.index(name)]
        self.dtype = codec.spec.dtype
        # int8 / int4: the compiled kernel where it built and passed its self-check, else torch's
        # packed kernel (cpu_kernels.py; `cpu_kernels.status().reason` says which and why).
        self.compiled = cpu_kernels.projection(kind, self.format) if kind in ("int8", "int4") else None
        self.kernel_name = cpu_kernels.name(kind) if self.compiled else KERNEL_NAMES[kind]
        self._buffer: torch.Tensor | None = None  # `decode`: the decoded weight; `mxfp4`/`fp8`: a chunk
        self._index: torch.Tensor | None = None

    def prepare(self, parts):
        """What the kernel reads besides the stored bytes, made once per expert when the host
        lane first views it: int8's scales in the model's dtype (a conversion per call before).
        The host lane forgets them when the expert's weights are replaced (`HostLane.forget`)."""
        if self.kind == "int8" and self.compiled is None:  # the compiled kernel reads fp32 scales
            parts = {**parts, "kernel_scale": parts["scale"].reshape(-1).to(self.dtype)}
        return parts

    def weight(self, parts) -> torch.Tensor | Mapping[str, torch.Tensor]:
        """What `__call__` reads for one expert: its stored parts, or the decoded weight."""
        if self.kind != "decode":
            return parts
        if self._buffer is None:
            self._buffer = torch.empty(self.shape, dtype=self.dtype)
        self.format.decode(parts, self._buffer)
        return self._buffer

    def __call__(self, x: torch.Tensor, parts) -> torch.Tensor:
        if self.compiled is not None:
            return self.compiled(x, parts)
        if self.kind == "int8":
            scale = parts.get("kernel_scale")  # made once per expert (`prepare`)
            if scale is None:  # the kernel takes scales in the input's dtype
                scale = parts["scale"].reshape(-1).to(x.dtype)
            return torch._weight_int8pack_mm(x, parts["q"], scale)
        if self.kind == "int4":
            return torch._weight_int4pack_mm_for_cpu(x, parts["q"], self.format.group, parts["sz"])
        if self.kind in ("mxfp4", "fp8"):
            return self._chunked(x, parts)
        weight = self.weight(parts) if self.kind == "decode" else parts
        if isinstance(weight, Mapping):  # a Cast in the model's dtype: its one part
            weight = weight["w"]
        return x @ weight if self.transposed else F.linear(x, weight)

    def _chunked(self, x: torch.Tensor, parts) -> torch.Tensor:
        """`mxfp4` / `fp8`: `x [n, in] -> [n, out]`, the weight decoded a row chunk at a time
        into one reused buffer (a chunk stays in cache between its decode and its matmul, where a
        whole decoded expert went out to DRAM and back). Bit for bit `F.linear(x, decoded)` on a
        one-row `x`: each output is its own dot product over the same row."""
        mx = self.kind == "mxfp4"
        n_out, n_in = (self.shape[1], self.shape[0]) if mx else self.shape
        step = chunk_rows(n_in, 1 if mx else self.format.block[0])
        if self._buffer is None:
            self._buffer = torch.empty(step * n_in, dtype=self.dtype)
            self._index = torch.empty(step * n_in // (2 if mx else 1), dtype=torch.int32)  # a table index per byte
        outs = []
        for start in range(0, n_out, step):
            rows = min(step, n_out - start)
            w = self._buffer[: rows * n_in].view(rows, n_in)
            (_mxfp4_rows if mx else _fp8_rows)(self, parts, start, rows, w)
            outs.append(F.linear(x, w))
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]

    def bias(self, parts) -> torch.Tensor:
        """A bias parameter (`dense` or `decode`) as a tensor in the model's dtype."""
        if self.kind == "decode":
            return self.weight(parts)
        return parts["w"] if isinstance(parts, Mapping) else parts


# Weights decoded per chunk for `mxfp4` / `fp8`: 64K values (128 KB in bf16) sit in a core's L2
# beside the chunk's stored bytes, so the matmul reads them from cache.
CHUNK_VALUES = 1 << 16


def chunk_rows(n_in: int, multiple: int = 1) -> int:
    """Rows of an `[out, n_in]` weight per chunk: about `CHUNK_VALUES`, a multiple of `multiple`
    (FP8's block rows)."""
    return max(1, CHUNK_VALUES // max(1, n_in) // multiple) * multiple


@functools.cache
def _mxfp4_table(dtype: torch.dtype) -> torch.Tensor:
    """(E8M0 byte << 8 | blocks byte) -> the byte's two weights in `dtype`, packed in one int32
    (low nibble first): E2M1 value x 2 ** (byte - 127) in fp32 (exact: 2 significant bits),
    rounded once to `dtype`, what `MXFP4.decode` computes per weight. 65536 entries, 256 KB."""
    values = torch.tensor(FP4_VALUES)
    bits = torch.arange(256, dtype=torch.int32).bitwise_left_shift_(23).clamp_min_(0x400000)
    power = bits.view(torch.float32)  # 2 ** (byte - 127), exact: byte 0 the subnormal, 255 inf
    code = torch.arange(256)
    lo, hi = (power[:, None] * values[code & 15]), (power[:, None] * values[code >> 4])  # [scale, byte]
    return torch.stack((lo, hi), dim=-1).to(dtype).view(torch.int32).reshape(-1)


@functools.cache
def _fp8_values() -> torch.Tensor:
    """e4m3 byte -> its value in fp32 (exact), `[256]`."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def _mxfp4_rows(proj: Projection, parts, start: int, rows: int, w: torch.Tensor) -> None:
    """Rows `start:start + rows` of an MXFP4 weight's `[out, in]` rows into `w`, in the model
    dtype, bit for bit `MXFP4.decode`: one lookup per stored byte in a table indexed by the
    byte and its block's exponent (`_mxfp4_table`), so the scale costs no multiply."""
    blocks, scales = parts["blocks"][start : start + rows], parts["scales"][start : start + rows]
    index = proj._index[: blocks.numel()].view(blocks.shape)
    index.copy_(blocks).add_(scales.to(torch.int32).bitwise_left_shift_(8).unsqueeze(-1))
    torch.index_select(_mxfp4_table(w.dtype), 0, index.view(-1), out=w.view(torch.int32).view(-1))


def _fp8_rows(proj: Projection, parts, start: int, rows: int, w: torch.Tensor) -> None:
    """Rows `start:start + rows` (whole blocks) of an FP8 weight into `w`, in the model dtype,
    bit for bit `FP8Block.decode`: per block a 256-entry table of fp32(e4m3) x its fp32 scale,
    rounded once, and one lookup per stored byte (torch's float8 cast alone took ~4 ns a value)."""
    b0, b1 = proj.format.block
    n_in = w.shape[1]
    scale = parts["scale_inv"][start // b0 : (start + rows) // b0]  # [rows / b0, in / b1]
    table = (scale.reshape(-1, 1) * _fp8_values()).to(w.dtype).reshape(-1)  # [blocks * 256]
    grid = (rows // b0, b0, n_in // b1, b1)
    offset = torch.arange(scale.numel(), dtype=torch.int32).mul_(256).view(grid[0], 1, grid[2], 1)
    index = proj._index[: rows * n_in].view(grid)
    index.copy_(parts["weight"][start : start + rows].view(torch.uint8).view(grid)).add_(offset)
    torch.index_select(table, 0, index.view(-1), out=w.view(-1))


def decode_reason(codec: Codec, name: str, module) -> str:
    """Why parameter `name` is decoded before its matmul (`kind_of` said "decode"), in words for
    `stats()["host_kernels"]`: what a kernel on the stored bytes would need."""
    fmt, dtype = codec.formats[name], codec.spec.dtype
    shape = codec.spec.shapes[codec.spec.names.index(name)]
    model = str(dtype).removeprefix("torch.")
    if dtype == torch.float32:
        return f"a {model} model: decode then F.linear is exact and the packed kernels gain little"
    if isinstance(fmt, Cast):
        return f"stored as {str(fmt.dtype).removeprefix('torch.')} in a {model} model"
    if isinstance(fmt, FP8Block):
        return f"FP8 {list(shape)} in blocks of {list(fmt.block)}: partial edge blocks"
    if getattr(module, "is_transposed", False):
        return "transposed experts: the packed kernels read [out, in] weights"
    if isinstance(fmt, Int4):
        from .compression import torch_int4_block

        block = torch_int4_block()
        need = f"rows a multiple of {block}, K of the group {fmt.group}" if block else "a torch that packs int4 here"
        return f"int4 {list(shape)} stored in the {fmt.layout} layout: the kernel's needs a bf16 model, {need}"
    if isinstance(fmt, Int8):
        if not hasattr(torch, "_weight_int8pack_mm"):
            return "this torch has no torch._weight_int8pack_mm"
        if dtype in (torch.bfloat16, torch.float16):
            return f"int8 {list(shape)}: torch's kernel needs K a multiple of {INT8_PACK_K}, no compiled kernel ran"
    return f"{fmt.name}: no kernel on its stored bytes in a {model} model"
