"""One short GPU check: CUDA tests, then a bench whose experts must stream over PCIe.

Prints, last, one table: measured tokens/s per predictor against all-resident and
on-demand; H2D GB/s achieved against calibrated; share of time stalled; simulated against
measured. Runs without network in well under 8 minutes on one GPU. Without CUDA it runs
the same flow on CPU with a small shape (the CPU-safe parts), and says so. Exits non-zero when
a test fails. Warnings (a host store that could not be pinned, above all) are shown, not hidden.

    python scripts/gpu_check.py [--shape qwen3-30b-a3b] [--layers 4] [--tokens 24] [--skip-tests]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time

import torch

from moe_prefetch.evidence.bench import SHAPES, run_bench, shape_model
from moe_prefetch.evidence.calibration import calibrate
from moe_prefetch.experts.layout import decoder_layers


class DecodeBytes:
    """Bytes loaded at the start of each forward of the attached run (a pre-hook on decoder
    layer 0, registered before attach's own), so H2D uses the bench's decode window: forwards
    1..n-2, the ones `tokens_per_s` times. Prefill (forward 0) loads nearly every expert."""

    def __init__(self, model):
        self.model = model
        self.runtime = None
        self.at_forward: list[int] = []
        self.host_memory: set[str] = set()
        decoder_layers(model)[0].register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        runtime = self.model.__dict__.get("_moe_prefetch_runtime")
        if runtime is None:
            return
        if runtime is not self.runtime:  # a new attach: a new run
            self.runtime, self.at_forward = runtime, []
            self.host_memory.add(runtime.store.pin_reason)
        self.at_forward.append(runtime.cache.totals().bytes_loaded)

    def decode_window(self) -> tuple[int, int] | None:
        """(bytes loaded, forwards) in the last run's decode window."""
        if len(self.at_forward) < 3:
            return None
        return self.at_forward[-1] - self.at_forward[1], len(self.at_forward) - 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    # Show the library's warnings (a store that could not be pinned makes every number below
    # pageable-speed): only transformers' chatter is quieted.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cuda = torch.cuda.is_available()
    shape = args.shape or ("qwen3-30b-a3b" if cuda else "olmoe-1b-7b")
    layers = args.layers or (4 if cuda else 2)
    started = time.perf_counter()
    lines = []
    tests_failed = False
    if not args.skip_tests:
        marker = "gpu" if cuda else "not slow and not gpu"
        tests = (
            ["tests/test_cuda.py", "tests/test_cuda_runtime.py", "tests/test_memory.py"]
            if cuda
            else ["tests/test_loader.py", "tests/test_sim.py", "tests/test_store.py"]
        )
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-s", "-m", marker, *tests],
            capture_output=True,
            text=True,
        )
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(proc.stdout[-6000:])
        print(proc.stderr[-2000:], file=sys.stderr)
        tests_failed = proc.returncode != 0  # failures, errors, or nothing collected (5)
        verdict = f"FAILED (pytest exit {proc.returncode})" if tests_failed else "passed"
        lines.append(f"tests ({'CUDA' if cuda else 'CPU-safe subset'}): {verdict}: {summary}")
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
    watch = DecodeBytes(model)

    def progress(row):
        row["decode_bytes_loaded"], row["decode_forwards"] = watch.decode_window() or (0, 0)

    result = run_bench(
        model,
        ids,
        predictors,
        [args.fraction, 1.0],
        args.tokens,
        device=device,
        profiles=profiles,
        lookahead=2,
        progress=progress,
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
        # decode bytes over decode time: the same forwards tokens_per_s counts
        seconds = row["decode_forwards"] / row["tokens_per_s"] if row["tokens_per_s"] else 0.0
        h2d_cell = f"{row['decode_bytes_loaded'] / seconds / 1e9:.2f}" if seconds else "-"  # "-": no decode window
        sim = row["simulated"].get(calibrated.name) if calibrated is not None else None
        tps = row["tokens_per_s"]
        sim_cell = f"{sim:.2f}" if sim else "-"
        ratio_cell = f"{sim / tps:.2f}" if sim and tps else "-"
        print(
            f"{row['predictor']:<15}{row['cache_fraction']:>7.3g}{tps:>9.2f}"
            f"{tps / on_demand['tokens_per_s']:>13.2f}x{tps / resident['tokens_per_s']:>12.2f}x"
            f"{row['hit_rate']:>7.3f}{row['stall_share']:>8.1%}{h2d_cell:>10}{sim_cell:>11}{ratio_cell:>10}"
        )
    for line in lines:
        print(line)
    for reason in sorted(watch.host_memory):
        flag = "WARNING: " if cuda and not reason.startswith("pinned") else ""
        print(f"{flag}host expert store: {reason}")
    if h2d_cal:
        print(
            f"calibrated pinned H2D: {h2d_cal / 1e9:.2f} GB/s (H2D GB/s above is decode bytes loaded / decode wall "
            "time, a lower bound on link use)"
        )
    print(f"gpu-check took {time.perf_counter() - started:.0f} s")
    if tests_failed:
        print("gpu-check FAILED: a test failed (output above)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
