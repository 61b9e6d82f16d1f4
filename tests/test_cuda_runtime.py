"""CUDA-only checks of the runtime's own defects list (issue: ready for a real GPU): experts
of a loaded model stay off the device on detach, the pool's memory is reusable after detach,
stalls are the CUDA-event times, compile is switched off while attached, and decode makes no
device->host synchronisation beyond the routing read. Skipped without a GPU."""

import copy

import pytest
import torch
from tiny_models import make_model, prompt, save_model

import moe_prefetch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_detach_after_load_keeps_experts_off_the_device(tmp_path):
    save_model("qwen3_moe", tmp_path)
    model, runtime = moe_prefetch.load(tmp_path, device="cuda", cache_slots=4)
    assert model.generation_config.disable_compile is True
    experts = runtime.layers[0].experts
    runtime.detach()
    params = list(experts.parameters())
    assert params and all(p.device.type == "cpu" and p.numel() > 0 for p in params)


def test_device_memory_is_reusable_after_detach():
    model = make_model("mixtral")
    reserved = []
    for _ in range(5):
        runtime = moe_prefetch.attach(model, device="cuda", cache_slots=6)
        with torch.no_grad():
            model(prompt(1, 4).cuda())
        runtime.detach()
        torch.cuda.empty_cache()
        reserved.append(torch.cuda.memory_reserved())
    assert max(reserved[1:]) <= reserved[1], reserved


def test_stall_is_measured_with_cuda_events_per_step():
    model = make_model("olmoe")
    runtime = moe_prefetch.attach(model, device="cuda", cache_slots=2, predictor="next-gate", lookahead=2)
    try:
        ids = prompt(1, 4).cuda()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        stats = runtime.stats(flush=True)
        assert stats["stall_timing"] == "cuda-events"
        assert stats["misses"] > 0 and stats["stall_seconds"] > 0 and stats["stall_by_step"]
        assert abs(sum(stats["stall_by_step"].values()) - stats["stall_seconds"]) < 1e-6
    finally:
        runtime.detach()


def test_decode_has_no_synchronisation_beyond_the_routing_read():
    stock = make_model("mixtral").cuda()
    model = copy.deepcopy(stock).cpu()
    runtime = moe_prefetch.attach(model, device="cuda", cache_slots=16, predictor="next-gate", lookahead=2)
    try:
        ids = prompt(1, 6).cuda()
        with torch.no_grad():
            out = model(ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            model(nxt, past_key_values=out.past_key_values, use_cache=True)  # warm
            torch.cuda.set_sync_debug_mode("warn")
            with pytest.warns(UserWarning) as seen:
                model(nxt, past_key_values=out.past_key_values, use_cache=True)
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in seen if "synchroniz" in str(w.message)]
        assert len(syncs) <= len(runtime.layers), [str(w.message) for w in syncs]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        runtime.detach()


@pytest.mark.parametrize("experts_dtype", ["int8", "int4"])
@pytest.mark.parametrize("on_miss", ["wait", "auto"])
def test_compressed_experts_on_cuda_match_their_reference(experts_dtype, on_miss):
    """Compressed slots on the device, decoded there before the kernel (and on the host lane by
    the CPU): the same greedy tokens as the all-resident compressed model on the same GPU."""
    from moe_prefetch.experts.compression import compress_experts

    stock = make_model("mixtral")
    reference = compress_experts(copy.deepcopy(stock), experts_dtype).cuda()
    model = copy.deepcopy(stock)
    runtime = moe_prefetch.attach(model, device="cuda", cache_slots=3, experts_dtype=experts_dtype, on_miss=on_miss)
    try:
        ids = prompt(2, 7).cuda()
        mask = torch.ones_like(ids)
        with torch.no_grad():
            expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(got, expected)
        stats = runtime.stats(flush=True)
        assert stats["experts_dtype"] == experts_dtype and stats["evictions"] > 0
        assert runtime.pool.buffer.dtype == torch.uint8 and runtime.pool.buffer.device.type == "cuda"
    finally:
        runtime.detach()
