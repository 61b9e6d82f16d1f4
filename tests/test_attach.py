"""attach/detach are exact inverses; the host store and slot pool hold what they claim."""

import gc
import threading

import pytest
import torch
from tiny_models import make_model, prompt

import moe_prefetch
from moe_prefetch.experts.layout import find_moe_layers
from moe_prefetch.model import guards


def _snapshot(model):
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v2"])
def test_attach_detach_restores_parameters(arch):
    model = make_model(arch)
    before = _snapshot(model)
    ids = prompt(2, 5)
    with torch.no_grad():
        expected = model(ids).logits
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=3)
    experts = find_moe_layers(model)[0].experts
    assert all(p.numel() == 0 for p in experts.parameters()), "experts must leave the model"
    assert experts.config._experts_implementation == "moe_prefetch"
    assert model.config._experts_implementation == "grouped_mm", "the model's own config stays untouched"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    runtime.detach()
    assert experts.config is model.config and model.config._experts_implementation == "grouped_mm"
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, value) in before.items():
        assert after[name] is param, f"{name} is a new Parameter object"
        assert torch.equal(param, value), name
    assert not model._forward_pre_hooks and all(not m._forward_pre_hooks for m in model.modules())
    assert not [v for m in model.modules() for v in m.__dict__.values() if getattr(v, guards.MARK, False)]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_store_and_slots_hold_the_experts():
    model = make_model("mixtral")
    stock = {n: p.detach().clone() for n, p in find_moe_layers(model)[1].experts.named_parameters()}
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4, verify_slots=True)
    views = runtime.store.expert((1, 5))
    assert torch.equal(views["gate_up_proj"], stock["gate_up_proj"][5])
    assert torch.equal(views["down_proj"], stock["down_proj"][5])
    assert not runtime.store.pinned and "CPU" in runtime.store.pin_reason
    assert tuple(runtime.pool.params["gate_up_proj"].shape) == (4, *stock["gate_up_proj"].shape[1:])
    with torch.no_grad():
        model(prompt(1, 4))
    runtime.verify()  # every READY slot holds exactly its expert's bytes
    runtime.detach()


pytestmark = pytest.mark.usefixtures("host_lane_beside_the_device")  # conftest.py


@pytest.mark.parametrize("on_miss", ["wait", "auto"])
def test_stats_contract(on_miss):
    model = make_model("olmoe")
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=2, on_miss=on_miss)
    model.generate(prompt(1, 4), attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, do_sample=False)
    stats = runtime.stats()
    for key in (
        *("hits", "misses", "prefetch_issued", "prefetch_used", "bytes_loaded", "stall_seconds", "per_layer"),
        *("host_experts", "uploads", "uploads_used", "host_seconds", "on_miss"),
    ):
        assert key in stats
    assert len(stats["per_layer"]) == 2
    lane = "misses" if on_miss == "wait" else "host_experts"  # on a CPU device auto runs misses on the host
    assert sum(layer[lane] for layer in stats["per_layer"]) == stats[lane] > 0
    routed = sum(len(r["experts"]) for r in runtime.trace)
    assert stats["hits"] + stats["misses"] + stats["host_experts"] == routed
    assert stats["loader"] == "cpu-thread" and stats["stall_timing"] == "cpu-wait"
    assert {r["step"] for r in runtime.trace} == {0, 1, 2}
    runtime.detach()


def test_attach_twice_and_detach_twice():
    model = make_model("mixtral")
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=2)
    with pytest.raises(moe_prefetch.ConfigError, match="already attached"):
        moe_prefetch.attach(model, device="cpu", cache_slots=2)
    runtime.detach()
    runtime.detach()  # idempotent
    assert not runtime.attached


def test_auto_sized_pool_fits_free_memory():
    model = make_model("mixtral")
    runtime = moe_prefetch.attach(model, device="cpu")
    assert runtime.cache.num_slots == 16  # all experts fit in free host memory
    runtime.detach()


def test_repeated_attach_detach_leaves_no_thread_behind():
    """Memory over many cycles is tests/test_memory.py's: its store is large enough (72 MiB) that
    one leaked per cycle shows in RSS; this tiny store (under 1 MiB) is not."""
    model = make_model("mixtral")
    moe_prefetch.attach(model, device="cpu", cache_slots=2).detach()
    threads = len(threading.enumerate())
    for _ in range(20):
        moe_prefetch.attach(model, device="cpu", cache_slots=2).detach()
    assert len(threading.enumerate()) == threads


def _twin(model):
    """A second model built from the same config object, with the same weights."""
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_models_sharing_a_config_do_not_affect_each_other():
    model = make_model("mixtral")
    twin, third = _twin(model), _twin(model)
    assert twin.config is model.config
    ids = prompt(1, 5)
    with torch.no_grad():
        expected = model(ids).logits
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=3)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, expected), "an unattached twin runs its own weights"
        third_runtime = moe_prefetch.attach(third, device="cpu", cache_slots=2)
        assert third_runtime.kernel.__name__ == "grouped_mm_experts_forward", "never the runtime's own function"
        torch.testing.assert_close(third(ids).logits, expected, atol=1e-5, rtol=0)
        runtime.detach()  # detaching one model leaves the other attached, and running offloaded
        torch.testing.assert_close(third(ids).logits, expected, atol=1e-5, rtol=0)
        stats = third_runtime.stats()
        assert stats["hits"] + stats["misses"] + stats["host_experts"] > 0
        assert torch.equal(model(ids).logits, expected)
    third_runtime.detach()


def test_a_module_left_dispatching_to_the_runtime_runs_stock():
    model = make_model("olmoe")
    ids = prompt(1, 4)
    with torch.no_grad():
        expected = model(ids).logits
        model.set_experts_implementation("moe_prefetch")  # by hand, never attached
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-6, rtol=0)


def test_detach_after_load_gives_experts_back_in_host_memory(tmp_path):
    from tiny_models import save_model

    save_model("qwen3_moe", tmp_path)
    model, runtime = moe_prefetch.load(tmp_path, device="cpu", cache_slots=4)
    layer = find_moe_layers(model)[0]
    runtime.detach()
    params = list(layer.experts.parameters())
    assert params and all(p.device.type == "cpu" and p.numel() > 0 for p in params)
    assert model.generation_config.disable_compile in (None, False), "restored"


def test_detach_gives_the_pool_back():
    """Nothing the runtime keeps after detach (the scheduler's copy source included) holds the
    device pool, so the next attach in this process can reuse its memory."""
    import weakref

    model = make_model("mixtral")
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4, predictor="next-gate")
    assert model.generation_config.disable_compile is True, "compile is off while attached"
    with torch.no_grad():
        model(prompt(1, 4))
    pool = weakref.ref(runtime.pool.buffer)
    runtime.detach()
    gc.collect()
    assert pool() is None, "the pool outlived detach"
    assert runtime.scheduler.source is None and runtime.pool is None
