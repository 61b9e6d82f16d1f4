"""What a CPU can show of the CUDA paths' fixes (issue 20, items 6 and 11); their CUDA twins are
in test_cuda.py and test_cuda_runtime.py."""

import pytest
import torch
from tiny_models import make_model, prompt

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
