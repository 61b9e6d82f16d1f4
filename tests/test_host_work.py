"""Host work per MoE layer: one device->host read in decode, per-layer state, bounded histories."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from tiny_models import make_model, prompt

import moe_prefetch
from moe_prefetch.runtime.cache import ExpertCache

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class ReadCounter:
    """Counts device->host reads as CUDA would pay them: `.cpu()`, and `.tolist()`, `.item()`,
    `.numpy()`, `bool()`, `int()`, `float()` of any tensor that is not already a host copy
    made by `.cpu()` (on CPU `.cpu()` returns the tensor itself, so that marks it)."""

    METHODS = ("tolist", "item", "numpy", "__bool__", "__int__", "__float__")

    def __init__(self):
        self.reads = 0
        self._host: list[torch.Tensor] = []  # held, so their ids are not reused

    def _is_host(self, tensor) -> bool:
        return any(tensor is h for h in self._host)

    @contextlib.contextmanager
    def counting(self):
        originals = {name: getattr(torch.Tensor, name) for name in ("cpu", *self.METHODS)}

        def cpu(tensor, *args, **kwargs):
            out = originals["cpu"](tensor, *args, **kwargs)
            if not self._is_host(tensor):
                self.reads += 1
            self._host.append(out)
            return out

        def wrap(name):
            def method(tensor, *args, **kwargs):
                if not self._is_host(tensor):
                    self.reads += 1
                return originals[name](tensor, *args, **kwargs)

            return method

        try:
            torch.Tensor.cpu = cpu
            for name in self.METHODS:
                setattr(torch.Tensor, name, wrap(name))
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


def decode_reads(model, steps: int = 3) -> int:
    ids = prompt(1, 6)
    counter = ReadCounter()
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            with counter.counting():
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
    return counter.reads


@pytest.mark.parametrize(
    "arch,predictor,options",
    [
        ("mixtral", "next-gate", {"lookahead": 2}),
        ("mixtral", "next-gate", {"lookahead": 2, "prefetch_margin": 2}),
        ("qwen3_moe", "previous-token", {"lookahead": 2}),
        ("deepseek_v3", "next-gate", {"lookahead": 2}),
        ("mixtral", "none", {}),
    ],
)
def test_at_most_one_device_to_host_read_per_moe_layer_in_decode(arch, predictor, options):
    stock = make_model(arch)
    model = copy.deepcopy(stock)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=6, predictor=predictor, **options)
    try:
        steps = 3
        extra = decode_reads(model, steps) - decode_reads(stock, steps)
        per_layer = extra / (steps * len(runtime.layers))
        assert per_layer == 1, f"{per_layer} device->host reads per MoE layer (must be exactly the routing read)"
    finally:
        runtime.detach()


def test_m2r2_guesses_ride_on_the_routing_read(tmp_path):
    from moe_prefetch.predict.m2r2 import Adapters, TrainSettings, save_adapters

    stock = make_model("mixtral")
    model = copy.deepcopy(stock)
    from moe_prefetch.experts.layout import find_moe_layers

    layers = find_moe_layers(model)
    settings = TrainSettings(lookahead=1, rank=4, steps=1)
    pairs = [(a.layer_idx, b.layer_idx) for a in layers for b in layers if b.layer_idx > a.layer_idx]
    adapters = Adapters(model.config.hidden_size, 4, pairs, settings.source)
    path = tmp_path / "adapters.safetensors"
    save_adapters(path, adapters, model, layers, settings, {}, [])
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=6, predictor="m2r2", predictor_path=str(path))
    try:
        extra = decode_reads(model, 2) - decode_reads(stock, 2)
        assert extra / (2 * len(runtime.layers)) == 1
    finally:
        runtime.detach()


def test_histories_stay_bounded_unless_recording():
    model = make_model("olmoe")
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=3, predictor="next-gate", history=5)
    try:
        ids = prompt(1, 4)
        with torch.no_grad():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False
            )
        assert len(runtime.trace) == 5 and len(runtime.predictions) <= 5 and len(runtime.step_starts) == 5
        assert len(runtime.loader.events) <= 5 and len(runtime.stats()["stall_by_step"]) <= 5
        assert runtime.trace[-1]["step"] == 11, "the window keeps the latest records"
        runtime.record(True)
        runtime.reset_stats()
        with torch.no_grad():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False
            )
        assert len(runtime.step_starts) == 12 and len(runtime.trace) == 12 * len(runtime.layers)
    finally:
        runtime.detach()


def test_cache_state_is_indexed_per_layer():
    """Per-layer indexes agree with the global table through evictions, drops and demotions."""
    cache = ExpertCache(4, 1, [0, 1, 2])
    for key in [(0, 1), (1, 2), (2, 3), (0, 4)]:
        slot, _ = cache.access(key)
        cache.mark_ready(slot)
        cache.unpin(slot)
    before = cache.layer_version[1]
    slot, _ = cache.prefetch((1, 5))  # evicts (0, 1): layer 0 and 1 change, layer 2 does not
    assert cache.lookup((0, 1)) is None and cache.resident[1] == {2: cache.slot_of[(1, 2)], 5: slot}
    assert cache.layer_version[1] == before + 1 and cache.unused[1] == {5}
    cache.drop((1, 5))
    assert 5 not in cache.resident[1] and not cache.unused[1]
    cache.check()


def test_prefetch_victim_walk_is_bounded():
    """A prefetch that finds nothing evictable gives up after a bounded walk, not a pool scan."""
    cache = ExpertCache(3000, 1, range(48))
    for i in range(3000):
        slot, _ = cache.access((i % 48, i // 48))
        cache.mark_ready(slot)
        cache.unpin(slot)
    looked = []

    def protected(key):
        looked.append(key)
        return True

    assert cache.prefetch((0, 127), protected=protected) is None
    assert len(looked) <= 64
