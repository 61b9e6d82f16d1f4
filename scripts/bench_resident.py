"""Decode-step overhead with every expert resident: moe-prefetch vs the stock model, on CPU.

Two copies of one random Mixtral-shaped model (the demo's shape by default): one stock, one
attached with a slot for every expert, warmed so nothing is ever loaded. Decode steps are
timed in alternating blocks so both see the same machine noise; we print medians and the
ratio. Usage: python scripts/bench_resident.py [--tokens 64] [--blocks 6] [--hidden 256]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moe_prefetch


def decode_times(model, tokens: int, seed: int, prompt_len: int = 16, cpu: list | None = None) -> list[float]:
    """Seconds per decode step after a random prompt of `prompt_len` tokens (also used by
    bench_scale.py); with `cpu`, each step's process CPU seconds are appended to it."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    times = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for _ in range(tokens):
            nxt = out.logits[:, -1:].argmax(-1)
            start, began = time.perf_counter(), time.process_time()
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            times.append(time.perf_counter() - start)
            if cpu is not None:
                cpu.append(time.process_time() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    config = MixtralConfig(
        vocab_size=4096,
        hidden_size=args.hidden,
        intermediate_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    stock = MixtralForCausalLM(config).eval()
    offloaded = copy.deepcopy(stock)
    runtime = moe_prefetch.attach(offloaded, device="cpu", cache_slots=args.layers * args.experts)
    with torch.no_grad():  # warm: a long prefill loads every expert once; then they stay
        offloaded(torch.randint(0, config.vocab_size, (4, 128)))
    decode_times(stock, 8, seed=99)
    runtime.reset_stats()
    stock_t, ours_t = [], []
    for block in range(args.blocks):
        stock_t += decode_times(stock, args.tokens, seed=block)
        ours_t += decode_times(offloaded, args.tokens, seed=block)
    stats = runtime.stats()
    s, o = statistics.median(stock_t), statistics.median(ours_t)
    print(
        f"model: Mixtral-shaped, hidden {args.hidden}, {args.layers} layers x {args.experts} experts, top-2, fp32, "
        f"CPU threads {torch.get_num_threads()}"
    )
    print(f"decode steps timed: {len(stock_t)} each, in {args.blocks} alternating blocks")
    print(f"stock median     {s * 1e3:8.3f} ms/token")
    print(
        f"resident median  {o * 1e3:8.3f} ms/token   (misses during timing: {stats['misses']}, on the host lane: "
        f"{stats['host_experts']}, kernel {stats['kernel_calls']})"
    )
    print(f"ratio            {o / s:8.3f}x  (target <= 1.10x)")
    runtime.detach()


if __name__ == "__main__":
    main()
