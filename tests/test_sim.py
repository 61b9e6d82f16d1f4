"""The simulator agrees with measurement: a CPU run whose copies are paced to a set link
bandwidth, replayed through the same scheduler on a virtual link of that bandwidth."""

import logging

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moe_prefetch
from moe_prefetch.loader import DEMAND
from moe_prefetch.sim import Clock, SimLoader, simulate


def paced_run(predictor: str, bandwidth: float, tokens: int = 24):
    logging.disable(logging.WARNING)
    config = MixtralConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    runtime = moe_prefetch.attach(
        model,
        device="cpu",
        cache_slots=12,
        predictor=predictor,
        lookahead=2,
        link_bandwidth=bandwidth,
        on_miss="wait",  # the simulator's link lane; its host lane is still to come
        record=True,
    )
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    starts = runtime.step_starts
    measured = (len(starts) - 2) / (starts[-1] - starts[1])  # decode steps 1..n-1, fully bracketed
    result = dict(
        trace=list(runtime.trace),
        predictions=list(runtime.predictions),
        step_starts=list(starts),
        expert_bytes=runtime.spec.nbytes,
        stats=runtime.stats(),
    )
    runtime.detach()
    return measured, result


@pytest.mark.parametrize("predictor", ["none", "next-gate"])
def test_simulated_tokens_per_second_within_15_percent(predictor):
    bandwidth = 80e6  # 80 MB/s: each 262 kB expert takes ~3.3 ms, so stalls dominate
    measured, run = paced_run(predictor, bandwidth)
    sim = simulate(
        run["trace"],
        cache_slots=12,
        expert_bytes=run["expert_bytes"],
        bandwidth=bandwidth,
        moe_layer_ids=[0, 1, 2, 3],
        num_layers=4,
        predictions=run["predictions"],
        step_starts=run["step_starts"],
        predictor="recorded",
        lookahead=2,
    )
    assert run["stats"]["misses"] > 0 and sim["stall_share"] > 0.1, "the link must matter in this check"
    ratio = sim["tokens_per_s"] / measured
    print(f"{predictor}: measured {measured:.1f} tok/s, simulated {sim['tokens_per_s']:.1f} tok/s, ratio {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15


def test_sim_loader_orders_demand_first():
    clock = Clock()
    loader = SimLoader(3, clock, bandwidth=1.0, expert_bytes=1)  # 1 s per copy
    loader.submit(0, None, None, 2.0)  # the link is free: this one starts at once
    loader.submit(1, None, None, 1.0)
    loader.submit(2, None, None, DEMAND)
    loader.wait(2, layer_idx=0)  # after the copy in flight, the demand copy goes before slot 1
    assert clock.now == pytest.approx(2.0)
    assert loader.cancel(1) and not loader.cancel(0)  # slot 1 never reached the link
    assert loader.done(0) and loader.done(2)
    assert loader.take_stalls()[0] == pytest.approx(2.0)
    assert [e["slot"] for e in loader.events] == [0, 2]
