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
  decode  anything else (a compressed fp32 model, MXFP4, FP8, int4 in a layout the kernel does
          not read, transposed compressed experts): decoded into a reused buffer in the model's
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

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .compression import Cast, Codec, Int4, Int8

KINDS = ("dense", "int8", "int4", "decode")
# What ran, in words (`Runtime.stats()["host_kernels"]`).
KERNEL_NAMES = {
    "dense": "F.linear on the stored weights",
    "int8": "torch._weight_int8pack_mm on the stored int8 bytes",
    "int4": "torch._weight_int4pack_mm_for_cpu on the stored int4 bytes",
    "decode": "decode into the model dtype, then F.linear",
}


def projections(module) -> tuple[str, str]:
    """The up and down projection parameters of an experts module, in call order."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"), "down_proj"


def kind_of(codec: Codec, name: str, module) -> str:
    """How the host lane runs parameter `name` of `module`'s experts, stored with `codec`."""
    fmt, dtype = codec.formats[name], codec.spec.dtype
    transposed = getattr(module, "is_transposed", False)
    if isinstance(fmt, Cast) and fmt.dtype == dtype:
        return "dense"
    if transposed:  # packed kernels want [out, in] with scales per output channel / input group
        return "decode"
    if isinstance(fmt, Int8) and dtype in (torch.bfloat16, torch.float16) and hasattr(torch, "_weight_int8pack_mm"):
        return "int8"
    shape = codec.spec.shapes[codec.spec.names.index(name)]
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
KERNEL_BYTE_COST = {"dense": 1.0, "int8": 1.9, "int4": 1.5}
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
        self._buffer: torch.Tensor | None = None  # `decode`: the decoded weight, reused per call
        # int8 / int4: the compiled kernel where it built and passed its self-check, else torch's
        # packed kernel (cpu_kernels.py; `cpu_kernels.status().reason` says which and why).
        self.compiled = cpu_kernels.projection(kind, self.format) if kind in ("int8", "int4") else None
        self.kernel_name = cpu_kernels.name(kind) if self.compiled else KERNEL_NAMES[kind]

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
            scale = parts["scale"].reshape(-1).to(x.dtype)  # the kernel takes scales in the input's dtype
            return torch._weight_int8pack_mm(x, parts["q"], scale)
        if self.kind == "int4":
            return torch._weight_int4pack_mm_for_cpu(x, parts["q"], self.format.group, parts["sz"])
        weight = self.weight(parts) if self.kind == "decode" else parts
        if isinstance(weight, Mapping):  # a Cast in the model's dtype: its one part
            weight = weight["w"]
        return x @ weight if self.transposed else F.linear(x, weight)

    def bias(self, parts) -> torch.Tensor:
        """A bias parameter (`dense` or `decode`) as a tensor in the model's dtype."""
        if self.kind == "decode":
            return self.weight(parts)
        return parts["w"] if isinstance(parts, Mapping) else parts
