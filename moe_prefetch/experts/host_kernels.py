"""The host lane's fast path for int8 experts: torch's weight-only int8 kernel reads the stored
bytes directly, instead of decoding the expert into the model's dtype and running the stock
kernel on it.

Why: in bf16 the decode writes and re-reads the whole expert at full size, so on the host it
costs several times the matmul itself; `torch._weight_int8pack_mm` reads the int8 weights and
their per-channel scales as stored. Measured with `python scripts/bench_compression.py` (one
expert, hidden 1024, intermediate 3584, one token, 1 thread): decode + matmul 10.9 ms, packed
0.60 ms, bf16 weights already resident 1.88 ms (docs/benchmarks.md, "Compressed experts").
In fp32 the packed kernel gains little (1.3x) and decode + stock kernel is exact, so fp32
models keep the exact path; int4 keeps it too, because torch's CPU int4 kernel needs its own
weight layout (repacking one expert costs more than decoding it).

The expert's arithmetic stays the model's own: up projection, then the module's `_apply_gate`
(or `act_fn` without a gate), then the down projection, biases where it has them; only the
two matmuls change, so results match the decode path within the model dtype's rounding.
Eligible: int8 projections, a half-precision model, experts stored `[out, in]` (not transposed:
the scales are per output channel), no post-expert norm.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .compression import Codec, Int8


def packed_int8(codec: Codec, module) -> bool:
    """Whether `module`'s experts, stored with `codec`, take the int8 fast path on the host."""
    if not hasattr(torch, "_weight_int8pack_mm") or codec.spec.dtype not in (torch.bfloat16, torch.float16):
        return False
    if getattr(module, "is_transposed", False) or getattr(module, "has_post_expert_norm", False):
        return False
    up = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    return all(isinstance(codec.formats.get(name), Int8) for name in (up, "down_proj"))


def run_int8(codec: Codec, module, row: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One expert (stored `row`) on tokens `x` `[n, hidden]`, scaled by `weights` `[n, 1]`."""
    parts = codec.typed(row)
    has_gate = getattr(module, "has_gate", True)
    up = "gate_up_proj" if has_gate else "up_proj"
    out = _linear(x, parts[up], _bias(codec, parts, f"{up}_bias", module))
    out = module._apply_gate(out) if has_gate else module.act_fn(out)
    out = _linear(out, parts["down_proj"], _bias(codec, parts, "down_proj_bias", module))
    return out * weights.to(out.dtype)


def _linear(x: torch.Tensor, part: Mapping[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    scale = part["scale"].reshape(-1).to(x.dtype)  # the kernel takes scales in the input's dtype
    out = torch._weight_int8pack_mm(x.contiguous(), part["q"], scale)
    return out if bias is None else out + bias


def _bias(codec: Codec, parts, name: str, module) -> torch.Tensor | None:
    if not getattr(module, "has_bias", False) or name not in parts:
        return None
    out = torch.empty(codec.spec.shapes[codec.spec.names.index(name)], dtype=codec.spec.dtype)
    codec.formats[name].decode(parts[name], out)
    return out
