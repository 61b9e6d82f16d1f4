"""The host lane's int8 and int4 kernels on this CPU: torch's packed kernels against the compiled
ones (moe_prefetch/experts/cpu_kernels.c), per expert, in microseconds and stored GB/s.

One expert call is what the host lane runs for one token: the up projection (`[2I, D]`), the
SiLU-gated product, the down projection (`[D, I]`), on one activation row in bf16. `--copies`
experts of each format (random weights, 100 by default: ~160 MB of int8, more than the caches)
are swept in turn, so each call reads its expert from DRAM as the host lane does. The variants
run alternately within each repeat (the machine's load hits them alike); figures are medians over
`--reps` repeats of one sweep each, wall and CPU time (`time.process_time`, all threads).
A plain copy of the int8 experts' bytes (read + write) and bf16 on torch's gemv give the scale.

With `--rows 1,4,16,64`: the up projection alone (`[2I, D]`) on that many activation rows (the
host lane's prefill), int8 and int4, torch's kernel against the compiled one, CPU time per matrix.

    python scripts/bench_cpu_kernels.py [--hidden 1024] [--inter 512] [--copies 100] [--reps 15] [--threads 1]
    python scripts/bench_cpu_kernels.py --rows 1,4,16,64 --copies 30
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

from moe_prefetch.experts import cpu_kernels  # noqa: E402
from moe_prefetch.experts.compression import Int4, Int8, torch_int4_block  # noqa: E402

GROUP = 64


def experts(hidden: int, inter: int, copies: int) -> dict[str, list]:
    """Per format, `copies` experts as the store holds them: (up parts, down parts)."""
    g = torch.Generator().manual_seed(0)
    block = torch_int4_block()
    int8, int4 = Int8(), Int4(GROUP, block, torch.bfloat16)
    out: dict[str, list] = {"bf16": [], "int8": [], "int4": []}
    for _ in range(copies):
        up = torch.randn(2 * inter, hidden, generator=g) * 0.02
        down = torch.randn(hidden, inter, generator=g) * 0.02
        out["bf16"].append((up.bfloat16(), down.bfloat16()))
        out["int8"].append((int8.encode(up), int8.encode(down)))
        if block:
            out["int4"].append((int4.encode(up), int4.encode(down)))
    return out


def stored_bytes(parts) -> int:
    tensors = parts if isinstance(parts, tuple) else (parts,)
    return sum(t.numel() * t.element_size() for p in tensors for t in (p.values() if isinstance(p, dict) else [p]))


def gated(h: torch.Tensor, inter: int) -> torch.Tensor:
    return F.silu(h[:, :inter]) * h[:, inter:]


def variants(inter: int) -> dict:
    """name -> (format, one expert call on x)."""
    block = torch_int4_block()

    def bf16(x, e):
        return F.linear(gated(F.linear(x, e[0]), inter), e[1])

    def int8_torch(x, e):
        # scales in the activation dtype, as host_kernels.py hands them to torch's kernel
        def mm(x, p):
            return torch._weight_int8pack_mm(x, p["q"], p["scale"].reshape(-1).to(x.dtype))

        return mm(gated(mm(x, e[0]), inter), e[1])

    def int8_c(x, e):
        def mm(x, p):
            return cpu_kernels.int8_mm(x, p["q"], p["scale"])

        return mm(gated(mm(x, e[0]), inter), e[1])

    def int4_torch(x, e):
        def mm(x, p):
            return torch._weight_int4pack_mm_for_cpu(x, p["q"], GROUP, p["sz"])

        return mm(gated(mm(x, e[0]), inter), e[1])

    def int4_c(x, e):
        def mm(x, p):
            return cpu_kernels.int4_mm(x, p["q"], GROUP, p["sz"], block)

        return mm(gated(mm(x, e[0]), inter), e[1])

    table = {"bf16 F.linear": ("bf16", bf16), "int8 torch packed": ("int8", int8_torch)}
    c = cpu_kernels.status().available
    if c:
        table[f"int8 {cpu_kernels.name('int8')}"] = ("int8", int8_c)
    if block:
        table["int4 torch packed"] = ("int4", int4_torch)
        if c:
            table[f"int4 {cpu_kernels.name('int4')}"] = ("int4", int4_c)
    return table


def rows_table(store: dict, inter: int, rows: list[int], reps: int) -> None:
    """CPU us per up projection on `rows` activation rows: torch's kernel and the compiled one."""
    block = torch_int4_block()
    kernels = {
        "int8": (
            lambda x, p: torch._weight_int8pack_mm(x, p["q"], p["scale"].reshape(-1).to(x.dtype)),
            lambda x, p: cpu_kernels.int8_mm(x, p["q"], p["scale"]),
        ),
        "int4": (
            lambda x, p: torch._weight_int4pack_mm_for_cpu(x, p["q"], GROUP, p["sz"]),
            lambda x, p: cpu_kernels.int4_mm(x, p["q"], GROUP, p["sz"], block),
        ),
    }
    hidden = store["bf16"][0][0].shape[1]
    copies = len(store["int8"])
    print(f"up projection {2 * inter} x {hidden}, {copies} copies swept, CPU us per matrix, medians of {reps}")
    print(f"{'rows':>5} " + " ".join(f"{f + ' torch':>11} {f + ' C':>8} {'torch/C':>7}" for f in kernels))
    for m in rows:
        x = torch.randn(m, hidden).bfloat16()
        cells = []
        for fmt, pair in kernels.items():
            if not store[fmt]:
                continue
            times = [[], []]
            for fn in pair:
                [fn(x, e[0]) for e in store[fmt]]  # warm
            for rep in range(reps):
                for j in (0, 1) if rep % 2 == 0 else (1, 0):
                    c0 = time.process_time()
                    for e in store[fmt]:
                        pair[j](x, e[0])
                    times[j].append((time.process_time() - c0) / len(store[fmt]) * 1e6)
            t, c = statistics.median(times[0]), statistics.median(times[1])
            cells.append(f"{t:11.0f} {c:8.0f} {t / c:6.2f}x")
        print(f"{m:>5} " + " ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512, help="moe_intermediate_size")
    ap.add_argument("--copies", type=int, default=100)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="", help="comma-separated activation row counts: the prefill table instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch._C._set_mkldnn_enabled(False)  # the host lane's one-row bf16 path: torch's own gemv
    st = cpu_kernels.status()
    print(f"compiled kernels: {st.reason}")
    store = experts(args.hidden, args.inter, args.copies)
    if args.rows:
        if not st.available:
            raise SystemExit(f"no compiled kernels to compare: {st.reason}")
        rows_table(store, args.inter, [int(r) for r in args.rows.split(",")], args.reps)
        return
    table = variants(args.inter)
    x = torch.randn(1, args.hidden).bfloat16()
    copy_src = [torch.cat([p["q"].reshape(-1) for p in e]) for e in store["int8"]]
    copy_dst = torch.empty_like(copy_src[0])

    def sweep(fn, fmt):
        for e in store[fmt]:
            fn(x, e)

    def copies():
        for src in copy_src:
            copy_dst.copy_(src)

    runs = {"copy int8 codes": (copies, None)} | {
        k: (lambda f=f, fmt=fmt: sweep(f, fmt), fmt) for k, (fmt, f) in table.items()
    }
    for fn, _ in runs.values():
        fn()  # warm: first-call allocation and kernel selection
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.reps):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for key in order:
            w0, c0 = time.perf_counter(), time.process_time()
            runs[key][0]()
            wall[key].append(time.perf_counter() - w0)
            cpu[key].append(time.process_time() - c0)
    print(f"one expert call, hidden {args.hidden}, moe_intermediate {args.inter}, {args.copies} copies swept, "
          f"{args.threads} thread(s), medians of {args.reps} repeats (measured on CPU)")  # fmt: skip
    print(f"{'kernel':<24} {'stored MB':>9} {'us/expert':>10} {'CPU us':>8} {'GB/s':>6} {'vs torch':>8}")
    base = {}
    for key, (_, fmt) in runs.items():
        nbytes = stored_bytes(store[fmt][0]) if fmt else copy_src[0].numel()
        us = statistics.median(wall[key]) / args.copies * 1e6
        cpu_us = statistics.median(cpu[key]) / args.copies * 1e6
        if "torch" in key:
            base[fmt] = us
        ratio = f"{base[fmt] / us:7.2f}x" if fmt in base and "torch" not in key else ""
        print(f"{key:<24} {nbytes / 1e6:9.2f} {us:10.1f} {cpu_us:8.1f} {nbytes / us / 1e3:6.2f} {ratio:>8}")


if __name__ == "__main__":
    main()
