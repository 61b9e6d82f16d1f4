"""A long-lived process holds steady memory: twenty attach/detach and twenty load/detach cycles
leave host anonymous RSS (and, on CUDA, the caching allocator's reserved memory) flat after warm-up."""

import gc

import psutil
import pytest
import torch
from tiny_models import prompt, sized_config
from transformers import AutoModelForCausalLM

import moe_prefetch

MiB = 2**20
# A leak raises the floor: the least memory of the last WINDOW cycles against the least of the
# first WINDOW after warm-up, 12 cycles apart. Floors, because memory freed late (a transient of
# one store, seen in 3 of 17 cycles) comes and goes; 24 MiB lets a leak of 2 MiB per cycle show.
CYCLES, WARMUP, WINDOW, FLAT = 20, 3, 5, 24 * MiB
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]


def _model():
    # 3 MoE layers x 8 experts x 3 MiB = 72 MiB of experts: a leaked store or model copy shows.
    config = sized_config("mixtral", hidden_size=256, intermediate_size=1024, num_hidden_layers=3)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _generate(model, device):
    ids = prompt(1, 4).to(device)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)


def _measure(cycle, device) -> tuple[list[int], list[int]]:
    """Host RSS and device reserved bytes after each cycle, once garbage and caches are dropped."""
    rss, reserved = [], []
    for _ in range(CYCLES):
        cycle()
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            reserved.append(torch.cuda.memory_reserved())
        rss.append(_anonymous_rss())
    return rss, reserved


def _anonymous_rss() -> int:
    """Resident memory less file-backed pages (libraries, mmapped checkpoints): the kernel drops
    those under memory pressure from other processes (RSS fell 829 -> 619 MiB in one run on a
    shared machine) and faults them back later, while a leak is anonymous memory."""
    info = psutil.Process().memory_info()
    return info.rss - getattr(info, "shared", 0)


def _assert_flat(name: str, values: list[int]) -> None:
    growth = min(values[-WINDOW:]) - min(values[WARMUP : WARMUP + WINDOW])
    trail = ", ".join(f"{v / MiB:.0f}" for v in values)
    assert growth <= FLAT, f"{name} grew {growth / MiB:.0f} MiB over {CYCLES - WARMUP} cycles (MiB: {trail})"


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_attach_detach_cycles_hold_memory_steady(device):
    model = _model()

    stores = []

    def cycle():
        runtime = moe_prefetch.attach(model, device=device, cache_slots=4, predictor="next-gate", lookahead=2)
        _generate(model, runtime.device)
        stores.append(runtime.store.nbytes)
        runtime.detach()

    rss, reserved = _measure(cycle, device)
    assert FLAT < min(stores), "the bound must let a store leaked on every detach show"
    _assert_flat("host anonymous RSS", rss)
    if device == "cuda":
        _assert_flat("CUDA reserved", reserved)
        assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_load_detach_cycles_hold_memory_steady(device, tmp_path):
    _model().save_pretrained(tmp_path)
    gc.collect()

    def cycle():
        model, runtime = moe_prefetch.load(tmp_path, device=device, cache_slots=4, predictor="next-gate", lookahead=2)
        _generate(model, runtime.device)
        runtime.detach()

    rss, reserved = _measure(cycle, device)
    _assert_flat("host anonymous RSS", rss)
    if device == "cuda":
        _assert_flat("CUDA reserved", reserved)
