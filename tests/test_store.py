"""The host store on CPU: exact sizes, chunks of one layer, the pinning logic (CUDA registration
replaced by a recorder; the real one runs in test_cuda.py), layer-by-layer attach, memory returned."""

import gc
import logging
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from tiny_models import make_model, prompt, sized_config
from transformers import AutoModelForCausalLM

import moe_prefetch
from moe_prefetch.experts.layout import ExpertSpec, find_moe_layers, spec_of
from moe_prefetch.runtime import store as store_mod
from moe_prefetch.runtime.store import PAGE, HostStore

MiB = 2**20


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


class Registry:
    """Stands in for cudaHostRegister/cudaHostUnregister and records the calls in order."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple] = []
        self.live: dict[int, int] = {}
        self.fail_at = fail_at

    def register(self, ptr, nbytes):
        if self.fail_at is not None and len([c for c in self.calls if c[0] == "register"]) == self.fail_at:
            raise RuntimeError("cudaHostRegister: out of memory (2)")
        assert ptr not in self.live, "registered twice"
        self.calls.append(("register", ptr, nbytes))
        self.live[ptr] = nbytes

    def unregister(self, ptr):
        assert ptr in self.live, "unregistered a pointer that is not registered"
        self.calls.append(("unregister", ptr))
        del self.live[ptr]


@pytest.fixture
def registry(monkeypatch):
    reg = Registry()
    monkeypatch.setattr(store_mod, "_cuda_register", reg.register)
    monkeypatch.setattr(store_mod, "_cuda_unregister", reg.unregister)
    return reg


def _spec(numel: int, dtype=torch.float32) -> ExpertSpec:
    return ExpertSpec(names=("w",), shapes=((numel,),), dtype=dtype)


def _keys(layers: int, experts: int):
    return [(layer, e) for layer in range(layers) for e in range(experts)]


def test_sizes_are_exact_and_nothing_is_touched_up_front():
    # A Mixtral-sized bf16 expert (342 MiB): the caching host allocator would give each 684 MiB
    # chunk a 1 GiB block; here every chunk is exactly its experts, and nothing is resident yet.
    spec = _spec(342 * MiB // 2, torch.bfloat16)
    before = _rss()
    store = HostStore(spec, [(0, 0), (0, 1), (0, 2), (1, 0)], pin=False)
    assert _rss() - before < 32 * MiB, "building the store must not touch (zero-fill) its pages"
    assert store.nbytes == 4 * spec.nbytes  # 2 + 1 experts for layer 0 (1 GiB chunks), 1 for layer 1
    store.close()
    odd = _spec(1000)  # 4,096 bytes per expert after 64-element alignment; 3 per layer
    store = HostStore(odd, _keys(2, 3), pin=False)
    assert store.nbytes == 2 * -(-3 * odd.nbytes // PAGE) * PAGE
    store.close()


def test_chunks_hold_one_layer_each_and_are_pinned_as_each_layer_lands(registry, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 3 * 8192)  # 3 experts per chunk: 2 chunks per layer
    spec = _spec(2000)  # 8,192 bytes per expert
    store = HostStore(spec, _keys(3, 5), pin=True)
    assert not store.pinned, "nothing is pinned before its layer is written"
    original = store_mod.HostStore.write
    monkeypatch.setattr(
        store_mod.HostStore,
        "write",
        lambda self, key, t: (registry.calls.append(("write", key)), original(self, key, t)),
    )
    for layer in range(3):
        store.fill(layer, ((e, {"w": torch.full((2000,), float(10 * layer + e))}) for e in range(5)))
    # Each layer's two chunks are registered after its last expert is written, before the next layer.
    kinds = [c[0] if c[0] == "register" else c[1][0] for c in registry.calls]
    assert kinds == [0] * 5 + ["register"] * 2 + [1] * 5 + ["register"] * 2 + [2] * 5 + ["register"] * 2
    assert store.pinned and "pinned: CUDA" in store.pin_reason
    ranges = sorted(registry.live.items())
    assert all(ptr % PAGE == 0 and size % PAGE == 0 for ptr, size in ranges)
    assert sum(size for _, size in ranges) == store.nbytes
    for (layer, e), flat in store.items():
        assert torch.equal(flat[:2000], torch.full((2000,), float(10 * layer + e)))
        inside = [(p, s) for p, s in ranges if p <= flat.data_ptr() and flat.data_ptr() + spec.nbytes <= p + s]
        assert len(inside) == 1, "every expert lies in exactly one registered chunk"
        same_chunk = {k[0] for k, f in store.items() if inside[0][0] <= f.data_ptr() < sum(inside[0])}
        assert same_chunk == {layer}, "a chunk holds experts of one layer only"
    store.close()
    store.close()
    assert not registry.live and len([c for c in registry.calls if c[0] == "unregister"]) == 6


def test_pinning_failure_falls_back_to_pageable_and_says_so(monkeypatch, caplog):
    registry = Registry(fail_at=1)
    monkeypatch.setattr(store_mod, "_cuda_register", registry.register)
    monkeypatch.setattr(store_mod, "_cuda_unregister", registry.unregister)
    store = HostStore(_spec(2000), _keys(3, 2), pin=True)
    with caplog.at_level(logging.WARNING, logger="moe_prefetch.runtime.store"):
        for layer in range(3):
            store.fill(layer, ((e, {"w": torch.ones(2000)}) for e in range(2)))
    assert not store.pinned
    assert store.pin_reason.startswith("pageable: pinning failed (cudaHostRegister: out of memory")
    assert "stays pageable" in caplog.text and "ulimit -l" in caplog.text
    assert len(registry.live) == 1, "no further registration after a failure"
    store.close()
    assert not registry.live


def test_a_store_dropped_without_close_unregisters_before_its_memory_goes(registry):
    store = HostStore(_spec(2000), _keys(2, 2), pin=True)
    for layer in range(2):
        store.fill(layer, ((e, {"w": torch.ones(2000)}) for e in range(2)))
    assert len(registry.live) == 2
    del store
    gc.collect()
    assert not registry.live


def test_close_returns_the_memory_and_views_stay_valid():
    spec = _spec(2 * MiB)  # 8 MiB per expert, 64 MiB in all
    src = {"w": torch.full((2 * MiB,), 1.5)}  # one source: temporaries would stay in malloc's heap
    before = _rss()
    store = HostStore(spec, _keys(2, 4), pin=False)
    for layer in range(2):
        store.fill(layer, ((e, src) for e in range(4)))
    assert _rss() - before > 56 * MiB
    kept = store[(1, 3)]  # a view someone still holds keeps its memory valid after close
    store.close()
    del store
    assert bool((kept == 1.5).all())
    del kept
    assert _rss() - before < 8 * MiB, "closing the store must give its memory back"


def _big_mixtral(layers: int, intermediate: int, hidden: int = 256):
    config = sized_config("mixtral", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _watch_copies_out_of(model, monkeypatch, probe):
    """Call `probe(layer position)` after every copy whose source is a model expert parameter,
    however the store makes it (per expert, per chunk)."""
    layers = find_moe_layers(model)
    where = {p.untyped_storage().data_ptr(): i for i, la in enumerate(layers) for p in la.experts.parameters()}
    original = torch.Tensor.copy_

    def copy_(self, src, *args, **kwargs):
        out = original(self, src, *args, **kwargs)
        pos = where.get(src.untyped_storage().data_ptr()) if isinstance(src, torch.Tensor) else None
        if pos is not None:
            probe(pos)
        return out

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    return layers


def test_attach_moves_experts_layer_by_layer(monkeypatch):
    model = make_model("qwen3_moe")
    seen = []  # per copy out of layer `pos`: bytes each layer's expert parameters still hold

    def probe(pos):
        seen.append((pos, [sum(p.untyped_storage().nbytes() for p in la.experts.parameters()) for la in layers]))

    layers = _watch_copies_out_of(model, monkeypatch, probe)
    full = [sum(p.nbytes for p in la.experts.parameters()) for la in layers]
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=3)
    monkeypatch.undo()
    assert {pos for pos, _ in seen} == set(range(len(layers)))
    for pos, held in seen:
        assert all(h <= 16 for h in held[:pos]), f"copying layer {pos}: earlier layers not freed {held}"
        assert held[pos:] == full[pos:]
    runtime.detach()


def _attach_peak() -> tuple[int, int]:
    """(peak extra RSS during attach, bytes of one layer's experts), measured in this process."""
    # Every expert parameter is over 32 MiB, so glibc maps it on its own and freeing it gives it
    # back to the OS: resident memory shows the real peak.
    model = _big_mixtral(layers=3, intermediate=4352)  # 102 MiB of experts per layer
    layer_bytes = sum(p.nbytes for p in find_moe_layers(model)[0].experts.parameters())
    with torch.no_grad():  # a graph would hold the weights
        expected = model(prompt(1, 4)).logits
    base = _rss()
    peak = []
    patch = pytest.MonkeyPatch()
    _watch_copies_out_of(model, patch, lambda pos: peak.append(psutil.Process().memory_info().rss))
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4)
    patch.undo()
    with torch.no_grad():
        torch.testing.assert_close(model(prompt(1, 4)).logits, expected, atol=1e-5, rtol=0)
    runtime.detach()
    return max(peak) - base, layer_bytes


def test_attach_peak_host_memory_is_the_store_plus_one_layer():
    # In a fresh process: memory other tests left behind (freed late, or still held by the
    # allocator) would otherwise land in the window and blur a 100 MiB measurement.
    code = "import test_store; print(*test_store._attach_peak())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    extra, layer_bytes = map(int, out.stdout.split()[-2:])
    print(
        f"experts {3 * layer_bytes / MiB:.0f} MiB, one layer {layer_bytes / MiB:.0f} MiB, peak +{extra / MiB:.0f} MiB"
    )
    assert extra < 1.4 * layer_bytes, f"attach peaked at +{extra / MiB:.0f} MiB; one layer is {layer_bytes / MiB:.0f}"


def test_check_counts_the_peak_of_a_layer_by_layer_move(monkeypatch):
    model = make_model("mixtral")
    layers = find_moe_layers(model)
    store = HostStore(spec_of(layers), [(la.layer_idx, e) for la in layers for e in range(la.num_experts)], pin=False)
    layer_store = store.nbytes // len(layers)
    peak = store.absorb_peak_bytes(layers)
    assert layer_store <= peak < 2 * layer_store, "experts already on the host are freed as they move"
    store.close()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Small:
        available = layer_store // 2

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small)
    with pytest.raises(moe_prefetch.HostMemoryError, match="needs .* GiB but only"):
        moe_prefetch.attach(model, device="cpu", cache_slots=4)
    monkeypatch.undo()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_failed_move_gives_every_layer_its_experts_back(monkeypatch):
    model = make_model("mixtral")
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(prompt(1, 5)).logits

    def probe(pos):
        if pos == 1:  # halfway through the move: layer 0 is in the store, its model copy freed
            raise KeyboardInterrupt

    _watch_copies_out_of(model, monkeypatch, probe)
    with pytest.raises(KeyboardInterrupt):
        moe_prefetch.attach(model, device="cpu", cache_slots=4)
    monkeypatch.undo()
    for name, param in model.named_parameters():
        assert param is before[name][0] and torch.equal(param, before[name][1]), name
    with torch.no_grad():
        assert torch.equal(model(prompt(1, 5)).logits, expected)
