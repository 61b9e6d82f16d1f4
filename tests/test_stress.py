"""Concurrency stress: random routing, tiny caches, prefetches several layers ahead, a paced
link so copies overlap compute, many tokens. After every layer each ready slot must hold
exactly its expert (verify_slots), and outputs must equal the stock model's."""

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moe_prefetch
from moe_prefetch.errors import LoaderError


def model_and_prompt(seed=0):
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_jitter_noise=0.0,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(seed))
    return model, ids


@pytest.mark.slow
@pytest.mark.parametrize("predictor", ["next-gate", "previous-token", "oracle"])
@pytest.mark.parametrize("slots,bandwidth", [(2, None), (3, 2e7), (12, 4e6)])
def test_stress(predictor, slots, bandwidth):
    model, ids = model_and_prompt(seed=slots)
    mask = torch.ones_like(ids)
    expected = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    runtime = moe_prefetch.attach(
        model,
        device="cpu",
        cache_slots=slots,
        predictor=predictor,
        lookahead=3,
        on_miss="wait",  # the stress is on the loader and the cache: every miss goes over the link
        link_bandwidth=bandwidth,
        verify_slots=True,
    )
    try:
        if predictor == "oracle":  # replay a trace of this very prompt, recorded without offloading faults
            probe = moe_prefetch.attach(model_and_prompt(seed=slots)[0], device="cpu", cache_slots=8)
            probe.model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
            runtime.predictor.load_trace(probe.trace)
            probe.detach()
        got = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=20,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(got.sequences, expected.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=0)
        stats = runtime.stats()
        assert stats["evictions"] > 50
        if slots > 10 and predictor != "previous-token":  # smaller pools hold only recent experts
            assert stats["prefetch_issued"] > 0
        runtime.cache.check()
        assert all(pins == 0 for pins in runtime.cache.pins), "a slot stayed pinned after the run"
    finally:
        runtime.detach()


def test_loader_fault_surfaces_in_forward_and_detach_still_works():
    model, ids = model_and_prompt()
    with torch.no_grad():
        expected = model(ids).logits
    runtime = moe_prefetch.attach(
        model, device="cpu", cache_slots=2, predictor="next-gate", lookahead=2, on_miss="wait"
    )
    source = runtime.scheduler.source

    def faulty(key, slot):  # copies of layer 3's experts fail in the loader thread
        src, dst = source(key, slot)
        return (torch.zeros(3), dst) if key[0] == 3 else (src, dst)

    runtime.scheduler.source = faulty
    with pytest.raises(LoaderError, match="copying an expert into its slot failed"), torch.no_grad():
        for _ in range(5):
            model(ids)
    runtime.detach()  # must not hang on the failed loader
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
