"""Decode hit rate of each eviction policy on the demo model's real routing (on-demand, no prediction).

Records the routing of greedy decoding from held-out prompts (the demo corpus's held-out split),
then replays each trace through a fresh ExpertCache per policy and cache size: every layer call
pins its experts (a miss is a demand load), then releases them, as the runtime does. Offloading
never changes the routing, so one recording serves every policy.

    PYTHONPATH=. python scripts/policy_hit_rates.py [--prompts 8] [--tokens 64]

The LRU column equals the runtime's own decode hit rate for the same prompt and slots (checked).
"""

from __future__ import annotations

import argparse

import torch

import moe_prefetch
from moe_prefetch.predict.corpus import read_corpus
from moe_prefetch.runtime.cache import ExpertCache, make_policy
from moe_prefetch.runtime.config import CACHE_POLICIES


def record(prompts: list[str], tokens: int) -> list[list[dict]]:
    from transformers import AutoTokenizer

    from moe_prefetch.model.loading import resolve_path

    model, runtime = moe_prefetch.load("demo", device="cpu", cache_slots=48, record=True)
    tok = AutoTokenizer.from_pretrained(resolve_path("demo"))
    traces = []
    for text in prompts:
        ids = torch.tensor([tok(text)["input_ids"]])
        runtime.reset_stats()  # each prompt's trace starts at step 0 (its prefill)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
        traces.append([dict(r) for r in runtime.trace])
    return traces


def replay(trace: list[dict], slots: int, policy: str) -> tuple[int, int]:
    """(decode hits, decode misses) of `trace` through a `slots`-slot cache under `policy`."""
    layers = sorted({r["layer_idx"] for r in trace})
    cache = ExpertCache(slots, expert_bytes=1, layer_ids=layers, policy=make_policy(policy))
    hits = misses = 0
    for r in trace:
        before = cache.counters[r["layer_idx"]]
        h0, m0 = before.hits, before.misses
        taken = []
        for expert_id in r["experts"]:
            slot, _ = cache.access((r["layer_idx"], expert_id))
            cache.mark_ready(slot)
            taken.append(slot)
        for slot in taken:
            cache.unpin(slot)
        if r["step"] >= 1:  # step 0 is the prefill, which touches nearly every expert
            hits += cache.counters[r["layer_idx"]].hits - h0
            misses += cache.counters[r["layer_idx"]].misses - m0
    return hits, misses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-chars", type=int, default=400)
    args = parser.parse_args()
    text = read_corpus("heldout", max_chars=400_000)
    stride = len(text) // args.prompts
    prompts = [text[i * stride : i * stride + args.prompt_chars] for i in range(args.prompts)]
    traces = record(prompts, args.tokens)
    total = 48  # 6 layers x 8 experts
    print(f"{args.prompts} held-out prompts x {args.tokens} greedy tokens; decode hit rate (on-demand replay)")
    print("slots  " + "  ".join(f"{p:>6}" for p in CACHE_POLICIES))
    for fraction in (0.25, 0.5):
        slots = int(total * fraction)
        rates = []
        for policy in CACHE_POLICIES:
            hm = [replay(t, slots, policy) for t in traces]
            h, m = sum(x[0] for x in hm), sum(x[1] for x in hm)
            rates.append(h / (h + m))
        print(f"{slots:>2} ({fraction:.0%})  " + "  ".join(f"{r:6.3f}" for r in rates))


if __name__ == "__main__":
    main()
