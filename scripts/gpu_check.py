"""One short GPU check: CUDA tests, then a bench whose experts must stream over PCIe.

Prints, last, one table: measured tokens/s per predictor against all-resident and
on-demand; H2D GB/s achieved against calibrated; share of time stalled; simulated against
measured. Runs without network in well under 8 minutes on one GPU. Without CUDA it runs
the same flow on CPU with a small shape (the CPU-safe parts), and says so.

    python scripts/gpu_check.py [--shape qwen3-30b-a3b] [--layers 4] [--tokens 24] [--skip-tests]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time

import torch

from moe_prefetch.bench import SHAPES, run_bench, shape_model
from moe_prefetch.profiles import calibrate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    cuda = torch.cuda.is_available()
    shape = args.shape or ("qwen3-30b-a3b" if cuda else "olmoe-1b-7b")
    layers = args.layers or (4 if cuda else 2)
    started = time.perf_counter()
    lines = []
    if not args.skip_tests:
        marker = "gpu" if cuda else "not slow and not gpu"
        tests = ["tests/test_cuda.py"] if cuda else ["tests/test_loader.py", "tests/test_sim.py"]
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-m", marker, *tests],
            capture_output=True,
            text=True,
        )
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(proc.stdout[-3000:])
        lines.append(f"tests ({'CUDA' if cuda else 'CPU-safe subset'}): {summary}")
    if cuda:
        calibrated, measured = calibrate("cuda")
        h2d_cal = max(measured["h2d_by_mib"].values())
    else:
        calibrated, h2d_cal = None, None
    dtype = torch.bfloat16 if cuda else torch.float32
    model = shape_model(shape, layers=layers, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    device = "cuda" if cuda else "cpu"
    profiles = [calibrated] if calibrated is not None else []
    predictors = ["none", "previous-token", "next-gate", "oracle"]
    result = run_bench(
        model, ids, predictors, [args.fraction, 1.0], args.tokens, device=device, profiles=profiles, lookahead=2
    )
    rows = [r for r in result["rows"] if r["tokens_per_s"] is not None]
    resident = next(r for r in rows if r["cache_fraction"] == 1.0 and r["predictor"] == "none")
    on_demand = next(r for r in rows if r["cache_fraction"] == args.fraction and r["predictor"] == "none")
    meta = result["meta"]
    print()
    print(
        f"gpu-check: {shape} shape, {layers} layers, random weights (routing is random), "
        f"{meta['experts_total']} experts x {meta['expert_bytes'] / 2**20:.1f} MiB, "
        f"cache {args.fraction:.0%}, {args.tokens} tokens, measured on {meta['measured_on']} "
        f"({'CUDA events' if cuda else 'CPU, no GPU: the CPU-safe parts only'})"
    )
    head = (
        f"{'predictor':<15}{'cache':>7}{'tok/s':>9}{'vs on-demand':>14}{'vs resident':>13}{'hit':>7}"
        f"{'stall':>8}{'H2D GB/s':>10}{'sim tok/s':>11}{'sim/meas':>10}"
    )
    print(head)
    for row in rows:
        seconds = 1 / row["tokens_per_s"] * args.tokens if row["tokens_per_s"] else 0
        h2d = row["bytes_loaded"] / seconds / 1e9 if seconds else 0.0
        sim = row["simulated"].get(calibrated.name) if calibrated is not None else None
        tps = row["tokens_per_s"]
        sim_cell = f"{sim:.2f}" if sim else "-"
        ratio_cell = f"{sim / tps:.2f}" if sim and tps else "-"
        print(
            f"{row['predictor']:<15}{row['cache_fraction']:>7.3g}{tps:>9.2f}"
            f"{tps / on_demand['tokens_per_s']:>13.2f}x{tps / resident['tokens_per_s']:>12.2f}x"
            f"{row['hit_rate']:>7.3f}{row['stall_share']:>8.1%}{h2d:>10.2f}{sim_cell:>11}{ratio_cell:>10}"
        )
    for line in lines:
        print(line)
    if h2d_cal:
        print(
            f"calibrated pinned H2D: {h2d_cal / 1e9:.2f} GB/s (H2D GB/s above is bytes loaded / decode wall time, "
            "a lower bound on link use)"
        )
    print(f"gpu-check took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
