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


def test_copy_overlaps_compute_and_pinned_bandwidth():
    """The copy is timed by events the loader records on its copy stream around the copy itself
    (`time_copies`): `submit` only queues it for the worker, so events around `submit` time
    nothing. Overlap: the copy's interval against the matmuls' interval on the compute stream,
    both measured from one origin event that completed before either was queued."""
    nbytes = 256 * MiB
    store = _filled_store(nbytes // 2, 1)  # copies come from the registered store, as in a run
    src = store[(0, 0)]
    dst = torch.zeros((1, src.numel()), dtype=torch.bfloat16, device="cuda")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    loader = CudaStreamLoader(1, torch.device("cuda"), time_copies=True)
    compute = torch.cuda.current_stream()

    def run(n: int, copy: bool) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
        """(copy interval, compute interval) in seconds after the origin, for a copy (if `copy`)
        and `n` matmuls queued together."""
        torch.cuda.synchronize()
        origin = torch.cuda.Event(enable_timing=True)
        origin.record(compute)
        origin.synchronize()  # every later event completes after it: elapsed times are positive
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if copy:
            loader.submit(0, src, dst[0], 0.0)
        began.record(compute)
        for _ in range(n):
            a @ a
        ended.record(compute)
        if copy:
            loader.wait(0, layer_idx=0)
        torch.cuda.synchronize()
        copied = None
        if copy:
            _, moved, start, end = loader.copy_timings[-1]
            assert moved == nbytes
            copied = (origin.elapsed_time(start) / 1e3, origin.elapsed_time(end) / 1e3)
        computed = (origin.elapsed_time(began) / 1e3, origin.elapsed_time(ended) / 1e3) if n else None
        return copied, computed

    def length(interval):
        return interval[1] - interval[0]

    try:
        run(0, copy=True)  # warm up: first copy, cuBLAS handle, kernels, clocks
        run(20, copy=False)
        copy_s = min(length(run(0, copy=True)[0]) for _ in range(3))
        one = min(length(run(10, copy=False)[1]) for _ in range(3)) / 10
        n = max(1, round(copy_s / one))  # compute about as long as the copy
        shares = []
        for _ in range(3):
            copied, computed = run(n, copy=True)
            overlap = max(0.0, min(copied[1], computed[1]) - max(copied[0], computed[0]))
            shares.append(overlap / min(length(copied), length(computed)))
        gbps = nbytes / copy_s / 1e9
        print(
            f"pinned H2D {gbps:.1f} GB/s; copy {copy_s * 1e3:.2f} ms, {n} matmuls {n * one * 1e3:.2f} ms; "
            f"overlap {max(shares):.0%} of the shorter (runs: {', '.join(f'{s:.0%}' for s in shares)})"
        )
        assert bool((dst[0] == 1).all()), "the copy did not land"
        assert gbps > 5, "pinned copies should run well above pageable speed"
        assert max(shares) >= 0.5, "the copy stream did not overlap compute"
    finally:
        loader.close()
        store.close()


def test_the_loader_names_its_device_and_sizes_its_ring():
    """The worker thread's current device is 0 whatever the compute thread's: the loader holds
    the indexed device; its ring holds >= 2 ms of link time at 50 GB/s (issue 20)."""
    loader = CudaStreamLoader(2, torch.device("cuda"))
    try:
        assert loader.device == torch.device("cuda", torch.cuda.current_device())
        assert loader.max_inflight * loader.chunk_bytes / 50e9 >= 2e-3
        assert loader.stream.device == loader.device
    finally:
        loader.close()
