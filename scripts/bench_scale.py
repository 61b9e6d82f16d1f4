"""Host work at the expert counts real models have, on CPU: moe-prefetch against stock.

A Qwen3-MoE-shaped model with tiny matrices (24 layers x 128 experts, top-8 by default), so
the runtime's own per-layer work dominates the step: anything that grows with the pool rather
than with the routing shows up here and hides at 6 x 8. Prints, as medians over alternating
blocks of decode steps:
  1. every expert resident (no loads during timing): decode step vs the stock model;
  2. half the experts cached, next-gate with lookahead 2, misses waiting for uploads and
     placed automatically (on a CPU device: on the host lane): decode step vs stock;
  3. the scheduler alone (cache + scheduler, an instant loader) at 48 layers x 128 experts
     with 3,000 slots: host time per MoE layer for prefetch + plan + acquire + release.
Usage: python scripts/bench_scale.py [--layers 24] [--experts 128] [--top-k 8] [--tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import statistics
import time

import torch
from bench_resident import decode_times  # scripts/ is on sys.path when a script runs
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import moe_prefetch
from moe_prefetch.runtime.cache import ExpertCache
from moe_prefetch.runtime.loader import Loader
from moe_prefetch.runtime.scheduler import Scheduler

CPU_SHARE_FLOOR = 0.95  # CPU time / wall of a timed block below this: the machine was busy, the block is dropped


def build_stock(layers: int, experts: int, top_k: int) -> Qwen3MoeForCausalLM:
    """A Qwen3-MoE shape at a real model's depth and expert count with tiny matrices (hidden 32),
    so a decode step is almost all host work; seeded, so every run builds the same weights."""
    config = Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).eval()


def ratio_to_stock(stock, offloaded, runtime, tokens: int, blocks: int) -> tuple[float, float, dict]:
    """Median decode step of each model over alternating blocks. Each block's CPU time over its
    wall time is kept in the stats ("cpu_share"); a block below CPU_SHARE_FLOOR (another process
    took the core) is dropped, for both models, when at least one block is left."""
    decode_times(stock, 4, seed=99, prompt_len=8)
    decode_times(offloaded, 4, seed=99, prompt_len=8)
    runtime.reset_stats()
    kept, shares, cpu_s = [], [], ([], [])  # CPU seconds of each stock and offloaded decode step
    for block in range(blocks):
        wall, cpu = time.perf_counter(), time.process_time()
        stock_steps = decode_times(stock, tokens, seed=block, prompt_len=8, cpu=cpu_s[0])
        ours_steps = decode_times(offloaded, tokens, seed=block, prompt_len=8, cpu=cpu_s[1])
        share = (time.process_time() - cpu) / (time.perf_counter() - wall) / torch.get_num_threads()
        shares.append(share)
        kept.append((share, (stock_steps, ours_steps)))
    good = [pair for share, pair in kept if share >= CPU_SHARE_FLOOR] or [pair for _, pair in kept]
    stock_t = [t for pair in good for t in pair[0]]
    ours_t = [t for pair in good for t in pair[1]]
    stats = runtime.stats()
    stats["cpu_share"] = shares
    stats["blocks_kept"] = len(good)
    # CPU time per decode step, median: what the process itself spent (the loader thread's too),
    # whatever else the machine ran
    stats["cpu_s_per_step"] = (statistics.median(cpu_s[0]), statistics.median(cpu_s[1]))
    return statistics.median(stock_t), statistics.median(ours_t), stats


def per_layer_us(stock_s: float, ours_s: float, moe_layers: int) -> float:
    """The runtime's host time per MoE layer over stock's, in microseconds."""
    return (ours_s - stock_s) / moe_layers * 1e6


class InstantLoader(Loader):
    """Copies land at once: what is left is the scheduler's and the cache's own host work."""

    kind = "instant"

    def submit(self, slot, src, dst, priority, tag=None):
        pass

    def done(self, slot):
        return True

    def wait(self, slot, layer_idx):
        pass

    def cancel(self, slot):
        return False


def scheduler_us_per_layer(layers: int, experts: int, top_k: int, slots: int, steps: int, seed: int = 0) -> float:
    """Median host time per MoE layer of prefetch + plan + acquire + release, with sticky
    routing (each step keeps most of the previous step's experts) and 80%-right predictions
    two layers ahead, as next-gate gives."""
    rng = random.Random(seed)
    cache = ExpertCache(slots, 1, range(layers))
    scheduler = Scheduler(cache, InstantLoader(slots), lambda key, slot: (None, None), range(layers), top_k=top_k)
    routing = {l: rng.sample(range(experts), top_k) for l in range(layers)}
    times = []
    for _ in range(steps):
        scheduler.new_step()
        for l in range(layers):  # this step's routing: sticky, a quarter changes
            keep = routing[l][: top_k - top_k // 4]
            routing[l] = keep + rng.sample([e for e in range(experts) if e not in keep], top_k - len(keep))
        for l in range(layers):
            start = time.perf_counter()
            said = []
            for d in (1, 2):
                if l + d < layers:
                    right = [e for e in routing[l + d] if rng.random() < 0.8]
                    said.append((l + d, d, right + rng.sample(range(experts), top_k - len(right))))
            scheduler.prefetch(l, said)
            _, waves = scheduler.plan(l, sorted(routing[l]))
            for wave in waves:
                held = scheduler.acquire(l, wave)
                scheduler.release(held.values())
            times.append(time.perf_counter() - start)
    return statistics.median(times[len(times) // 4 :]) * 1e6


def _per_layer_line(stock_s: float, ours_s: float, layers: int, stats: dict) -> str:
    shares = ", ".join(f"{x:.2f}" for x in stats["cpu_share"])
    busy = min(stats["cpu_share"]) < CPU_SHARE_FLOOR
    kept = (
        f"{stats['blocks_kept']} at >= {CPU_SHARE_FLOOR} kept"
        if any(x >= CPU_SHARE_FLOOR for x in stats["cpu_share"])
        else f"none reached {CPU_SHARE_FLOOR}: the machine was busy, figures unreliable"
    )
    cpu_stock, cpu_ours = stats["cpu_s_per_step"]
    return (
        f"    runtime over stock per MoE layer: {per_layer_us(stock_s, ours_s, layers):.0f} us of wall time (median "
        f"step), {per_layer_us(cpu_stock, cpu_ours, layers):.0f} us of CPU time (goal < 100 us); "
        f"CPU time / wall per block {shares}" + (f" ({kept})" if busy else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--sched-layers", type=int, default=48)
    parser.add_argument("--sched-slots", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: per-layer Python is what is timed)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    stock = build_stock(args.layers, args.experts, args.top_k)
    total = args.layers * args.experts
    print(
        f"model: Qwen3-MoE-shaped, hidden 32, {args.layers} layers x {args.experts} experts, top-{args.top_k}, "
        f"fp32, CPU threads {torch.get_num_threads()}; {args.blocks} alternating blocks of {args.tokens} steps"
    )

    resident = copy.deepcopy(stock)
    runtime = moe_prefetch.attach(resident, device="cpu", cache_slots=total)
    with torch.no_grad():  # a long prefill routes to (nearly) every expert once; then they stay
        resident(torch.randint(0, stock.config.vocab_size, (4, 256)))
    s, o, stats = ratio_to_stock(stock, resident, runtime, args.tokens, args.blocks)
    print(
        f"all {total} experts resident: stock {s * 1e3:.2f} ms, moe-prefetch {o * 1e3:.2f} ms per step -> "
        f"{o / s:.2f}x (goal 1.1x, limit 1.3x); misses while timed {stats['misses']}, kernel {stats['kernel_calls']}"
    )
    print(_per_layer_line(s, o, args.layers, stats))
    runtime.detach()

    for on_miss in ("wait", "auto"):
        half = copy.deepcopy(stock)
        runtime = moe_prefetch.attach(
            half, device="cpu", cache_slots=total // 2, predictor="next-gate", lookahead=2, on_miss=on_miss
        )
        s, o, stats = ratio_to_stock(stock, half, runtime, args.tokens, args.blocks)
        print(
            f"half cached ({total // 2} slots), next-gate lookahead 2, on_miss={on_miss}: stock {s * 1e3:.2f} ms, "
            f"moe-prefetch {o * 1e3:.2f} ms per step -> {o / s:.2f}x (limit 2x); hit rate {stats['hit_rate']:.3f}, "
            f"host experts {stats['host_experts']}, kernel {stats['kernel_calls']}"
        )
        print(_per_layer_line(s, o, args.layers, stats))
        runtime.detach()

    us = scheduler_us_per_layer(args.sched_layers, args.experts, args.top_k, args.sched_slots, steps=40)
    print(
        f"scheduler host time per MoE layer at {args.sched_layers} layers x {args.experts} experts, top-{args.top_k}, "
        f"{args.sched_slots} slots: {us:.1f} us (goal < 50 us)"
    )


if __name__ == "__main__":
    main()
