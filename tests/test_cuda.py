"""CUDA-only checks: pinned store, stream loader, overlap of copy and compute, exactness.
Skipped without a GPU (`make gpu-check` runs them on one)."""

import pytest
import torch
from tiny_models import make_model, prompt

import moe_prefetch
from moe_prefetch.loader import CudaStreamLoader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_exact_on_cuda(arch):
    stock = make_model(arch).cuda()
    ids = prompt(2, 6).cuda()
    mask = torch.ones_like(ids)
    expected = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model = make_model(arch)
    runtime = moe_prefetch.attach(model, device="cuda", cache_slots=3, predictor="next-gate", lookahead=2)
    try:
        assert runtime.loader.kind == "cuda-stream" and runtime.store.pinned
        assert runtime.pool.buffer.is_cuda and runtime.store[(runtime.moe_layer_ids[0], 0)].is_pinned()
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, expected)
        stats = runtime.stats()
        assert stats["stall_timing"] == "cuda-events" and stats["misses"] > 0
    finally:
        runtime.detach()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_copy_overlaps_compute_and_pinned_bandwidth():
    nbytes = 256 << 20
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
    dst = torch.empty((1, nbytes // 2), dtype=torch.bfloat16, device="cuda")
    loader = CudaStreamLoader(1, torch.device("cuda"))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    # copy alone
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(loader.stream)
    loader.submit(0, src, dst[0], 0.0)
    end.record(loader.stream)
    torch.cuda.synchronize()
    copy_s = start.elapsed_time(end) / 1e3
    # compute alone
    c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    c0.record()
    for _ in range(20):
        a @ a
    c1.record()
    torch.cuda.synchronize()
    compute_s = c0.elapsed_time(c1) / 1e3
    # both at once
    t0 = torch.cuda.Event(enable_timing=True)
    t0.record()
    loader.submit(0, src, dst[0], 0.0)
    for _ in range(20):
        a @ a
    loader.wait(0, layer_idx=0)
    t1 = torch.cuda.Event(enable_timing=True)
    t1.record()
    torch.cuda.synchronize()
    both_s = t0.elapsed_time(t1) / 1e3
    gbps = nbytes / copy_s / 1e9
    print(
        f"pinned H2D {gbps:.1f} GB/s; copy {copy_s * 1e3:.1f} ms, compute {compute_s * 1e3:.1f} ms, "
        f"together {both_s * 1e3:.1f} ms -> overlapped: {both_s < 0.9 * (copy_s + compute_s)}"
    )
    assert gbps > 5, "pinned copies should run well above pageable speed"
    assert both_s < 0.9 * (copy_s + compute_s), "the copy stream did not overlap compute"
    loader.close()
