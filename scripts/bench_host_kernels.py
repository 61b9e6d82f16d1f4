"""The host lane's kernel per stored format, on one SwiGLU expert: CPU time per expert call, its
stored bytes per second, and its cost per stored byte against bf16 (what `host_kernels.KERNEL_BYTE_COST`
holds). One row (a decode step), oneDNN off as in a one-row decode step, each format cycling through
copies of the expert so its bytes come from DRAM; formats interleaved, medians over rounds.

    python scripts/bench_host_kernels.py [--hidden 1024 --inter 512] [--threads 1] [--rounds 5]

Prints a table and, with --json, writes the figures. Measured on CPU: quote CPU time and CPU/wall.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from moe_prefetch.evidence.calibration import _host_expert, _swiglu, format_calls
from moe_prefetch.experts.host_kernels import KERNEL_BYTE_COST


def timed(call, calls: int) -> tuple[float, float]:
    """CPU seconds and wall seconds per call over `calls` calls (after one untimed)."""
    call()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - cpu) / calls, (time.perf_counter() - wall) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="the medium model's (scripts/medium_model.py)")
    parser.add_argument("--inter", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=40, help="expert calls per format per round")
    parser.add_argument("--pool-mib", type=int, default=512, help="bf16 bytes cycled through (beyond the caches)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    first = _host_expert(args.hidden, args.inter, torch.bfloat16, gen)
    nbytes = sum(w.numel() * w.element_size() for w in first)
    copies = max(1, -(-(args.pool_mib << 20) // nbytes))
    x = torch.randn(1, args.hidden, generator=gen).to(torch.bfloat16)
    bf16 = itertools.cycle([first] + [tuple(w.clone() for w in first) for _ in range(1, copies)])
    calls = {"bf16": (nbytes, lambda: _swiglu(x, *next(bf16))), **format_calls(first, x, copies)}
    was = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)  # a one-row decode step's setting (model/decode_gemv.py)
    runs: dict[str, list[tuple[float, float]]] = {fmt: [] for fmt in calls}
    try:
        for _ in range(args.rounds):
            for fmt, (_, call) in calls.items():
                runs[fmt].append(timed(call, args.calls))
    finally:
        torch._C._set_mkldnn_enabled(was)
    rows = []
    for fmt, (stored, _) in calls.items():
        cpu = statistics.median(c for c, _ in runs[fmt])
        wall = statistics.median(w for _, w in runs[fmt])
        rows.append({"format": fmt, "stored_bytes": stored, "cpu_us": cpu * 1e6, "wall_us": wall * 1e6})
    base = rows[0]["cpu_us"] / rows[0]["stored_bytes"]
    for row in rows:
        row["stored_gb_s"] = row["stored_bytes"] / row["cpu_us"] / 1e3
        row["cpu_per_wall"] = row["cpu_us"] / row["wall_us"]
        row["byte_cost"] = row["cpu_us"] / row["stored_bytes"] / base  # bf16 bytes per stored byte
        row["byte_cost_now"] = KERNEL_BYTE_COST.get({"bf16": "dense"}.get(row["format"], row["format"]))
    print(
        f"measured on CPU: {args.threads} thread(s), expert {args.hidden} x {args.inter} SwiGLU, one row, "
        f"{copies} copies, median of {args.rounds} rounds x {args.calls} calls"
    )
    head = "| format | stored MB | CPU us / expert | wall us | CPU/wall | stored GB/s (CPU) | cost per stored byte |"
    print(head + " in KERNEL_BYTE_COST |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['format']} | {r['stored_bytes'] / 1e6:.2f} | {r['cpu_us']:.0f} | {r['wall_us']:.0f} | "
            f"{r['cpu_per_wall']:.2f} | {r['stored_gb_s']:.2f} | {r['byte_cost']:.2f} | {r['byte_cost_now']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"threads": args.threads, "shape": [args.hidden, args.inter], "copies": copies, "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
