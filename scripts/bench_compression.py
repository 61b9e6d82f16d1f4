"""Compressed experts on this CPU: bytes per expert, and decode + stock kernel against torch's
packed int8/int4 kernels on the host lane, for one Mixtral-like expert scaled down.

Three ways to run one expert (gate_up, SiLU-gated product, down) for one token:
- resident: the stock kernel (`F.linear`) on weights already in the model's dtype (the floor);
- decode + matmul: what compression.py does: `Codec.decode` into a buffer in the model's dtype,
  then the stock kernel;
- packed: torch's weight-only kernels reading the compressed weights directly
  (`torch._weight_int8pack_mm`; `aten._weight_int4pack_mm_for_cpu` after its one-off packing,
  `aten._convert_weight_to_int4pack_for_cpu`, timed apart), checked to compute the codec's values.
Then the decode of one expert against a plain copy of the same expert uncompressed (what the
link or the host lane moves for an uncompressed expert). Medians of `--reps` runs, one process.

    python scripts/bench_compression.py [--hidden 1024] [--inter 3584] [--reps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moe_prefetch.experts.compression import make_codec  # noqa: E402
from moe_prefetch.experts.layout import ExpertSpec, find_moe_layers, spec_of  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 1 << 20


def median_ms(fn, reps: int) -> float:
    fn()  # warm: first-call allocation and kernel selection
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def model_spec(name: str) -> ExpertSpec:
    """The per-expert layout of a demo folder or a reference shape, bf16, from a meta skeleton."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_prefetch.evidence.bench import SHAPES, shape_config
    from moe_prefetch.model.loading import resolve_path

    config = shape_config(name, 1) if name in SHAPES else AutoConfig.from_pretrained(resolve_path(name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return spec_of(find_moe_layers(model))


def bytes_table(names: list[str]) -> None:
    print("bytes per expert (make_codec(spec, dtype).nbytes; int4 with its default group)")
    print(f"{'model':<16}{'bf16':>16}{'int8':>22}{'int4':>22}")
    for name in names:
        spec = model_spec(name)
        sizes = {dtype: make_codec(spec, dtype).nbytes for dtype in ("bf16", "int8", "int4")}
        cells = [f"{sizes['bf16']:,}"] + [f"{sizes[d]:,} ({sizes[d] / sizes['bf16']:.3f}x)" for d in ("int8", "int4")]
        print(f"{name:<16}" + "".join(f"{c:>{w}}" for c, w in zip(cells, (16, 22, 22))))


def expert(hidden: int, inter: int, dtype: torch.dtype, seed: int = 0) -> tuple[ExpertSpec, dict]:
    """A Mixtral-layout expert: gate_up [2I, H] and down [H, I], as transformers stores them."""
    g = torch.Generator().manual_seed(seed)
    spec = ExpertSpec(names=("gate_up_proj", "down_proj"), shapes=((2 * inter, hidden), (hidden, inter)), dtype=dtype)
    weights = {n: (torch.randn(s, generator=g) * 0.02).to(dtype) for n, s in zip(spec.names, spec.shapes)}
    return spec, weights


def stored_row(codec, weights) -> torch.Tensor:
    row = torch.empty(codec.stored.numel, dtype=codec.stored.dtype)
    encoded = codec.encode(weights)
    for name, view in codec.stored.views(row).items():
        view.copy_(encoded[name].reshape(view.shape))
    return row


def ffn(x, gate_up, down, mm):
    gate, up = mm(x, gate_up).chunk(2, dim=-1)
    return mm(F.silu(gate) * up, down)


def packed_parts(codec, row: torch.Tensor, dtype: torch.dtype) -> dict:
    """The codec's stored parts rearranged for torch's packed kernels (done once per expert)."""
    typed = codec.typed(row.unsqueeze(0))
    out = {}
    for name, parts in typed.items():
        parts = {k: v[0] for k, v in parts.items()}
        if codec.name == "int8":
            out[name] = (parts["q"], parts["scale"].squeeze(-1).to(dtype))
        else:
            q = torch.stack((parts["q"] & 15, parts["q"] >> 4), dim=-1).reshape(parts["q"].shape[0], -1)
            scale, low = parts["scale"].float(), parts["low"].float()
            # torch's int4 kernels decode (q - 8) * scale + zero; ours q * scale + low.
            scale_zero = torch.stack((scale, low + 8 * scale), dim=-1).transpose(0, 1).contiguous().to(dtype)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
            group = codec.formats[name].group
            out[name] = (packed, group, scale_zero)
    return out


def packed_mm(name: str):
    if name == "int8":
        return lambda x, p: torch._weight_int8pack_mm(x, *p)
    return lambda x, p: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p[0], p[1], p[2])


def measure(spec, weights, x, name: str, reps: int) -> dict:
    """Medians (ms) for one codec over one expert: decode, decode + matmul, packed kernels."""
    codec = make_codec(spec, name)
    row = stored_row(codec, weights).unsqueeze(0)
    buf = torch.empty(1, spec.numel, dtype=spec.dtype)
    views = spec.views(buf)

    def decode_mm():
        codec.decode(row, buf)
        return ffn(x, views["gate_up_proj"][0], views["down_proj"][0], F.linear)

    parts, mm = packed_parts(codec, row[0], spec.dtype), packed_mm(name)
    reference, got = decode_mm(), ffn(x, parts["gate_up_proj"], parts["down_proj"], mm)
    tol = 1e-3 if spec.dtype == torch.float32 else 5e-2  # bf16 sums round differently per kernel
    torch.testing.assert_close(got.float(), reference.float(), atol=tol * reference.abs().max().item(), rtol=0)
    return {
        "pack": median_ms(lambda: packed_parts(codec, row[0], spec.dtype), max(3, reps // 10)),
        "decode": median_ms(lambda: codec.decode(row, buf), reps),
        "decode_mm": median_ms(decode_mm, reps),
        "packed": median_ms(lambda: ffn(x, parts["gate_up_proj"], parts["down_proj"], mm), reps),
    }


def kernels(hidden: int, inter: int, reps: int) -> None:
    print(f"\none expert, hidden {hidden}, intermediate {inter}, 1 token; medians of {reps}, ms")
    print(
        f"{'dtype':<6}{'experts':<8}{'resident':>10}{'decode+mm':>11}{'packed':>9}"
        f"{'decode':>9}{'copy':>8}{'decode/copy':>13}{'decode+mm/packed':>18}{'packed/resident':>17}"
    )
    packing = ""
    for label, dtype in DTYPES.items():
        spec, weights = expert(hidden, inter, dtype)
        x = torch.randn(1, hidden).to(dtype)
        plain = torch.cat([w.reshape(-1) for w in weights.values()]).unsqueeze(0)
        copy_out = torch.empty_like(plain)
        t_copy = median_ms(lambda: copy_out.copy_(plain), reps)  # noqa: B023 (timed before the next pass)
        t_resident = median_ms(lambda: ffn(x, weights["gate_up_proj"], weights["down_proj"], F.linear), reps)  # noqa: B023
        for name in ("int8", "int4"):
            t = measure(spec, weights, x, name, reps)
            packing += f"{label} {name} {t['pack']:.1f}; "
            print(
                f"{label:<6}{name:<8}{t_resident:>10.3f}{t['decode_mm']:>11.3f}{t['packed']:>9.3f}{t['decode']:>9.3f}"
                f"{t_copy:>8.3f}{t['decode'] / t_copy:>12.1f}x{t['decode_mm'] / t['packed']:>17.1f}x"
                f"{t['packed'] / t_resident:>16.2f}x"
            )
    print(f"(expert: {spec.nbytes / MIB:.1f} MiB in bf16; copy = the uncompressed expert, same dtype, memcpy)")
    print("one-off repacking of one stored expert into the packed kernels' layout, ms: " + packing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=3584)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the shared 2-core machine)")
    parser.add_argument("--models", default="demo,mixtral-8x7b,qwen3-30b-a3b", help="for the bytes table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    bytes_table([m for m in args.models.split(",") if m])
    kernels(args.hidden, args.inter, args.reps)


if __name__ == "__main__":
    main()
