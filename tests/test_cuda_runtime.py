"""CUDA-only checks of the runtime's own defects list (issue: ready for a real GPU): experts
of a loaded model stay off the device on detach, the pool's memory is reusable after detach,
stalls are the CUDA-event times, compile is switched off while attached, and decode makes no
device->host synchronisation beyond the routing read. Skipped without a GPU."""

import copy
import warnings

import pytest
import torch
from tiny_models import make_model, prompt, save_model, sized_config

import moe_prefetch
from moe_prefetch.errors import AttachedModelError

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
    # Experts of 6 MiB (fp32): a demand copy is still on the link when the compute stream is told
    # to wait for it, so the wait is a real stall. (The compute thread's block until the copy is
    # issued is `blocked_seconds`, not stall: a tiny expert can land before it is needed.)
    model = make_model("olmoe", config=sized_config("olmoe", hidden_size=256, intermediate_size=2048))
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


def decode_syncs(model, steps: int = 4) -> list[int]:
    """Synchronising CUDA calls torch reports (`set_sync_debug_mode("warn")`) in each of `steps`
    decode forwards after a prefill and one warm step. Not reported by torch: Event.synchronize
    (the loader's ring) and torch.cuda.synchronize."""
    ids = prompt(1, 6).cuda()
    counts = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)  # stays on the device: no read
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            counts.append(sum("synchroniz" in str(w.message) for w in seen))
    return counts


@pytest.mark.parametrize("on_miss", ["wait", "host", "auto"])
def test_decode_syncs_at_most_once_per_moe_layer_beyond_stock(on_miss):
    """In bf16 (in fp32 transformers' grouped_mm falls back to a loop that reads its offsets on
    the host, ~3 syncs per layer, in the stock model too) and with a pool far smaller than the
    experts, so decode misses, evicts and (host, auto) runs experts on the host lane: per MoE
    layer the runtime adds at most its one read (routing, guesses, host-lane inputs)."""
    stock = make_model("qwen3_moe").to(torch.bfloat16).cuda()
    model = make_model("qwen3_moe").to(torch.bfloat16)
    runtime = moe_prefetch.attach(
        model, device="cuda", cache_slots=3, predictor="next-gate", lookahead=1, on_miss=on_miss
    )
    try:
        baseline = decode_syncs(stock)
        runtime.reset_stats()
        ours = decode_syncs(model)
        stats = runtime.stats(flush=True)
        layers = len(runtime.layers)
        print(f"on_miss={on_miss}: syncs per decode step, stock {baseline}, runtime {ours}; {layers} MoE layers")
        assert stats["misses"] + stats["host_experts"] > 0 and stats["evictions"] > 0
        if on_miss == "host":
            assert stats["host_experts"] > 0
        if on_miss == "wait":
            assert stats["misses"] > 0
        assert max(ours) - min(baseline) <= layers, (baseline, ours)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        runtime.detach()


def test_host_blocked_time_is_apart_from_the_event_timed_stall():
    """Stall is the compute stream's wait on copy events (CUDA events); the host time the
    compute thread blocked until a copy's last chunk was issued is `blocked_seconds`."""
    model = make_model("olmoe").to(torch.bfloat16)
    runtime = moe_prefetch.attach(model, device="cuda", cache_slots=2, on_miss="wait")
    try:
        ids = prompt(1, 4).cuda()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        stats = runtime.stats(flush=True)
        assert stats["stall_timing"] == "cuda-events" and stats["misses"] > 0
        assert stats["blocked_seconds"] >= 0
        assert abs(sum(stats["stall_by_step"].values()) - stats["stall_seconds"]) < 1e-6
        stall, blocked = stats["stall_seconds"] * 1e3, stats["blocked_seconds"] * 1e3
        print(f"stall {stall:.2f} ms (CUDA events), compute thread blocked {blocked:.2f} ms (host clock)")
    finally:
        runtime.detach()


def test_a_cuda_graph_capture_is_refused():
    stock = make_model("mixtral").cuda()
    model = make_model("mixtral")
    runtime = moe_prefetch.attach(model, device="cuda", cache_slots=4)
    try:
        ids = prompt(1, 5).cuda()
        with torch.no_grad():
            model(ids)  # warm, outside the capture
            graph = torch.cuda.CUDAGraph()
            with pytest.raises(AttachedModelError, match="CUDA graph is being captured"):
                with torch.cuda.graph(graph):
                    model(ids)
            torch.cuda.synchronize()
            mask = torch.ones_like(ids)
            expected = stock.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(got, expected)
    finally:
        runtime.detach()


def test_detach_gives_back_the_decode_scratch_on_cuda():
    """The pool's device decode scratch goes with the pool: once detached, nothing holds it."""
    import gc
    import weakref

    model = make_model("mixtral").to(torch.bfloat16)
    runtime = moe_prefetch.attach(model, device="cuda", cache_slots=3, experts_dtype="int4", on_miss="wait")
    scratch = runtime.pool.scratch
    assert scratch is not None and scratch.buffer.is_cuda
    ids = prompt(1, 5).cuda()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert scratch.overflows == 0
    buffer = weakref.ref(scratch.buffer)
    del scratch
    runtime.detach()
    gc.collect()
    assert buffer() is None, "the decode scratch outlived detach"


@pytest.mark.parametrize("kind", ["int8", "int4", "mxfp4", "fp8"])
def test_device_decode_matches_the_cpu_decode(kind):
    """A wave decoded on CUDA (batched, pool scratch) against the CPU's per-expert decode of the
    same stored bytes: bit for bit (int4's product is exact, MXFP4's powers of two are built
    from their bits, FP8 is cast exactly before its one fp32 multiply)."""
    from test_compression import _stored_rows

    from moe_prefetch.experts.compression import Scratch, make_codec, scratch_bytes
    from moe_prefetch.experts.layout import ExpertSpec
    from moe_prefetch.experts.native import MXFP4, FP8Block

    spec = ExpertSpec(names=("w1", "w2"), shapes=((256, 512), (512, 128)), dtype=torch.bfloat16)
    native = {"mxfp4": {"w1": MXFP4(), "w2": MXFP4()}, "fp8": {"w1": FP8Block((128, 128)), "w2": FP8Block((128, 128))}}
    codec = make_codec(spec, "auto", native=native[kind]) if kind in native else make_codec(spec, kind)
    raw = {"mxfp4": ("w1.blocks", "w1.scales", "w2.blocks", "w2.scales"), "fp8": ("w1.weight", "w2.weight")}
    rows = _stored_rows(codec, 8, raw=raw.get(kind, ()))
    host = torch.empty(8, spec.numel, dtype=spec.dtype)
    codec.decode(rows, host)
    scratch = Scratch(torch.empty(scratch_bytes(codec, 8), dtype=torch.uint8, device="cuda"))
    work = torch.empty(9, spec.numel, dtype=spec.dtype, device="cuda")
    codec.decode(rows.cuda(), work[:8], scratch)
    torch.testing.assert_close(work[:8].cpu(), host, rtol=0, atol=0, equal_nan=True)
    assert scratch.overflows == 0


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
