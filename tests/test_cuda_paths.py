"""What a CPU can show of the CUDA paths' fixes (issue 20, items 6 and 11); their CUDA twins are
in test_cuda.py and test_cuda_runtime.py."""

import pytest
import torch
from tiny_models import make_model, prompt
from torch.utils._python_dispatch import TorchDispatchMode

import moe_prefetch
from moe_prefetch.errors import AttachedModelError
from moe_prefetch.experts import compression


def test_a_cuda_graph_capture_is_refused_before_any_state_moves(monkeypatch):
    """Capturing a CUDA graph through the runtime would freeze the captured token's slot table
    into every replay: refused with one clear error at the first hook, and the runtime then runs
    on unchanged (same tokens as stock)."""
    stock = make_model("mixtral")
    model = make_model("mixtral")
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4)
    try:
        ids = prompt(1, 5)
        monkeypatch.setattr(runtime, "_cuda", True)  # as on a CUDA device, whose stream is capturing
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        before = (runtime.step, runtime.cache.totals(), len(runtime.trace))
        with pytest.raises(AttachedModelError, match="CUDA graph is being captured .* runtime.detach"):
            with torch.no_grad():
                model(ids)
        assert (runtime.step, runtime.cache.totals(), len(runtime.trace)) == before
        monkeypatch.undo()
        mask = torch.ones_like(ids)
        expected = stock.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)
    finally:
        runtime.detach()


def test_detach_gives_back_the_decode_scratch():
    """Compressed experts on the host lane decode through reused buffers; detach drops them (up
    to 64 MiB each), as it drops the pool's own scratch."""
    model = make_model("mixtral")
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=2, experts_dtype="int4", on_miss="host")
    ids = prompt(1, 5)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert runtime.stats()["host_experts"] > 0 and compression._SCRATCH
    pool = runtime.pool
    runtime.detach()
    assert not compression._SCRATCH
    assert pool.scratch is None and pool.buffer is None and pool.staging is None


def test_host_blocked_time_is_counted_apart_from_the_stall():
    """On CUDA the compute thread may block until a copy's last chunk is issued; that host time
    is `blocked_seconds`, not stall (the stall is the event-timed wait of the compute stream)."""
    model = make_model("mixtral")
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4)
    try:
        layer = runtime.moe_layer_ids[0]
        runtime.loader._blocked[layer] += 0.25  # what CudaStreamLoader.wait records
        stats = runtime.stats()
        per_layer = {p["layer_idx"]: p for p in stats["per_layer"]}
        assert stats["blocked_seconds"] == 0.25 and per_layer[layer]["blocked_seconds"] == 0.25
        assert stats["stall_seconds"] == 0.0
    finally:
        runtime.detach()


class _SyncingOps(TorchDispatchMode):
    """Records the ops that read a device tensor's values to the host (a synchronisation on
    CUDA): nonzero, item, and histc asked for its range from the data (min == max)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in (torch.ops.aten.nonzero, torch.ops.aten._local_scalar_dense, torch.ops.aten.masked_select):
            self.seen.append(packet.__name__)
        elif packet is torch.ops.aten.histc:
            low, high = (list(args[2:4]) + [kwargs.get("min", 0), kwargs.get("max", 0)])[:2]
            if low == high:
                self.seen.append("histc(min == max)")
        return func(*args, **kwargs)


@pytest.mark.parametrize("on_miss", ["host", "wait"])
def test_the_experts_call_reads_nothing_from_the_device_but_the_routing(on_miss):
    """Issue 20, items 4 and 5: with host experts, several waves and one-expert waves, the
    runtime's per-layer path must not read device values beyond its one routing read (done as
    a copy, not an op): no `nonzero` to find a wave's tokens, no one-expert span whose histc
    takes its range from the data. Counted here as ops, beside the stock model's own."""
    stock = make_model("qwen3_moe")
    model = make_model("qwen3_moe")
    ids = prompt(1, 6)
    with torch.no_grad(), _SyncingOps() as counted:
        stock(ids)
    baseline = len(counted.seen)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=3, on_miss=on_miss)
    try:
        with torch.no_grad():
            expected = stock(ids).logits
            with _SyncingOps() as counted:
                got = model(ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        calls, host = runtime.kernel_calls, runtime.stats()["host_experts"]
        assert sum(calls.values()) > len(runtime.layers) or host, f"neither waves nor host experts: {calls}"
        assert len(counted.seen) == baseline, f"device reads beyond stock: {counted.seen}"
    finally:
        runtime.detach()
