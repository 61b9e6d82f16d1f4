"""Offloading never changes what the model computes: every architecture, every predictor,
caches much smaller than the experts (so eviction happens), prefill and decode, batch 1 and 2."""

import pytest
import torch
from tiny_models import ARCHS, prompt

import moe_prefetch
from moe_prefetch.layout import find_moe_layers

ATOL = 1e-4


def _generate(model, ids, n=5):
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits)


def _check(stock, model, runtime, batch):
    ids = prompt(batch=batch, length=7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=ATOL, rtol=0)
    seq_a, logits_a = _generate(stock, ids)
    seq_b, logits_b = _generate(model, ids)
    assert torch.equal(seq_a, seq_b)
    torch.testing.assert_close(logits_b, logits_a, atol=ATOL, rtol=0)
    stats = runtime.stats()
    assert stats["evictions"] > 0, "the cache was large enough that nothing was evicted"
    assert stats["misses"] > 0 and stats["bytes_loaded"] == stats["expert_bytes"] * (
        stats["misses"] + stats["prefetch_issued"] - stats["prefetch_dropped"]
    )


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_load_matches_stock(checkpoints, arch, batch):
    folder, stock = checkpoints[arch]
    top_k = max(layer.top_k for layer in find_moe_layers(stock))
    model, runtime = moe_prefetch.load(folder, device="cpu", cache_slots=top_k + 1)
    try:
        _check(stock, model, runtime, batch)
    finally:
        runtime.detach()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_cache_slots_equal_top_k(checkpoints, arch):
    folder, stock = checkpoints[arch]
    top_k = max(layer.top_k for layer in find_moe_layers(stock))
    model, runtime = moe_prefetch.load(folder, device="cpu", cache_slots=top_k)
    try:
        _check(stock, model, runtime, batch=2)
        assert runtime.stats()["cache_slots"] == top_k
    finally:
        runtime.detach()


@pytest.mark.parametrize("predictor", ["previous-token", "next-gate", "oracle"])
@pytest.mark.parametrize(
    "arch", ["mixtral", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss", "granitemoe", "qwen2_moe"]
)
def test_predictors_keep_outputs(checkpoints, arch, predictor):
    folder, stock = checkpoints[arch]
    model, runtime = moe_prefetch.load(
        folder, device="cpu", cache_slots=3, predictor=predictor, lookahead=2, verify_slots=True
    )
    try:
        _check(stock, model, runtime, batch=2)
        if predictor == "next-gate":  # previous-token's picks are still resident in so small a model
            assert runtime.stats()["prefetch_issued"] > 0
    finally:
        runtime.detach()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_bf16_waves_round_once(arch):
    """Prefill through waves in bf16: partial sums stay fp32 and round once, like the stock pass."""
    from tiny_models import make_model

    stock = make_model(arch).to(torch.bfloat16)
    ids = prompt(batch=2, length=12)
    with torch.no_grad():
        expected = stock(ids).logits
    top_k = max(layer.top_k for layer in find_moe_layers(stock))
    runtime = moe_prefetch.attach(stock, device="cpu", cache_slots=top_k)
    try:
        with torch.no_grad():
            got = stock(ids).logits
        assert max(r["waves"] for r in runtime.trace) > 1
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
    finally:
        runtime.detach()
