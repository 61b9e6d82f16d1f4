"""CUDA-only checks: the registered (pinned) store, the stream loader, overlap of copy and compute,
exactness. Skipped without a GPU (`make gpu-check` runs them on one)."""

import gc

import psutil
import pytest
import torch
from tiny_models import make_model, prompt

import moe_prefetch
from moe_prefetch.experts.layout import ExpertSpec
from moe_prefetch.runtime import store as store_mod
from moe_prefetch.runtime.loader import CudaStreamLoader
from moe_prefetch.runtime.store import HostStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MiB = 2**20


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _pool_bytes_ever() -> int:
    """Bytes PyTorch's caching host allocator has ever obtained from CUDA."""
    return torch.cuda.host_memory_stats().get("allocated_bytes.allocated", 0)


def _filled_store(numel: int, experts: int) -> HostStore:
    spec = ExpertSpec(names=("w",), shapes=((numel,),), dtype=torch.bfloat16)
    store = HostStore(spec, [(0, e) for e in range(experts)], pin=True)
    src = {"w": torch.ones(numel, dtype=torch.bfloat16)}
    store.fill(0, ((e, src) for e in range(experts)))
    return store


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_exact_on_cuda(arch):
    stock = make_model(arch).cuda()
    ids = prompt(2, 6).cuda()
    mask = torch.ones_like(ids)
    expected = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model = make_model(arch)
    runtime = moe_prefetch.attach(model, device="cuda", cache_slots=3, predictor="next-gate", lookahead=2)
    try:
        assert runtime.loader.kind == "cuda-stream" and runtime.store.pinned, runtime.store.pin_reason
        assert runtime.pool.buffer.is_cuda and all(runtime.store[key].is_pinned() for key in runtime.store)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, expected)
        stats = runtime.stats()
        assert stats["stall_timing"] == "cuda-events" and stats["misses"] > 0
        assert stats["host_memory"] == "pinned"
    finally:
        runtime.detach()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_store_is_registered_exactly_and_gives_memory_back():
    torch.cuda.init()
    pool_before, rss_before = _pool_bytes_ever(), _rss()
    # 3 x 100 MiB in one chunk: the caching host allocator would have taken a 512 MiB block
    store = _filled_store(50 * MiB, 3)
    assert store.pinned and all(store[key].is_pinned() for key in store), store.pin_reason
    assert store.nbytes == 300 * MiB
    grown = _rss() - rss_before
    assert 0.95 * store.nbytes <= grown <= 1.05 * store.nbytes, f"RSS grew {grown / MiB:.0f} MiB for 300 MiB"
    assert _pool_bytes_ever() == pool_before, "the store must not go through the caching host allocator"
    kept = store[(0, 1)]
    store.close()
    assert not kept.is_pinned(), "close() must unregister the memory"
    del store, kept
    assert _rss() - rss_before < 16 * MiB, "closing the store must give its memory back"


def test_a_failed_registration_leaves_cuda_usable():
    store = _filled_store(MiB, 2)
    chunk = store._chunks[0]
    with pytest.raises(RuntimeError, match="cudaHostRegister"):
        store_mod._cuda_register(chunk.rows.data_ptr(), chunk.nbytes)  # already registered: refused
    # The refusal must not linger as the thread's last CUDA error for torch's next kernel launch check.
    x = torch.ones(1024, device="cuda") + 1
    torch.cuda.synchronize()
    assert float(x.sum()) == 2048
    store.close()


def _timed(fn, stream=None) -> float:
    """Seconds `fn`'s work takes on `stream` (the current one by default), timed by CUDA events."""
    stream = stream or torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    fn()
    end.record(stream)
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def test_copy_overlaps_compute_and_pinned_bandwidth():
    nbytes = 256 * MiB
    store = _filled_store(nbytes // 2, 1)  # copies come from the registered store, as in a run
    src = store[(0, 0)]
    dst = torch.zeros((1, src.numel()), dtype=torch.bfloat16, device="cuda")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    loader = CudaStreamLoader(1, torch.device("cuda"))

    def copy():
        loader.submit(0, src, dst[0], 0.0)

    def matmuls(n):
        for _ in range(n):
            a @ a

    def both(n):
        copy()
        matmuls(n)
        loader.wait(0, layer_idx=0)

    try:
        _timed(copy, loader.stream)  # warm up: first copy, cuBLAS handle, kernels, clocks
        _timed(lambda: matmuls(20))
        copy_s = min(_timed(copy, loader.stream) for _ in range(3))
        one = min(_timed(lambda: matmuls(10)) for _ in range(3)) / 10
        n = max(1, round(copy_s / one))  # compute about as long as the copy: overlap then halves the time
        compute_s = min(_timed(lambda: matmuls(n)) for _ in range(3))
        both_s = min(_timed(lambda: both(n)) for _ in range(3))
        gbps = nbytes / copy_s / 1e9
        bound = max(copy_s, compute_s) + 0.2 * min(copy_s, compute_s)
        print(
            f"pinned H2D {gbps:.1f} GB/s; copy {copy_s * 1e3:.2f} ms, compute {compute_s * 1e3:.2f} ms ({n} matmuls), "
            f"together {both_s * 1e3:.2f} ms (bound {bound * 1e3:.2f} ms)"
        )
        assert bool((dst[0] == 1).all()), "the copy did not land"
        assert gbps > 5, "pinned copies should run well above pageable speed"
        assert both_s <= bound, "the copy stream did not overlap compute"
    finally:
        loader.close()
        store.close()
