"""What users and transformers' own model tests do to an attached model: it works, or one clear error."""

import pytest
import torch
from tiny_models import make_model, prompt
from transformers import AutoModelForCausalLM, DynamicCache

import moe_prefetch
from moe_prefetch import AttachedModelError
from moe_prefetch.experts.layout import find_moe_layers


def _attach(model, **options):
    return moe_prefetch.attach(model, device="cpu", cache_slots=4, **options)


def _refused(call, match):
    with pytest.raises(AttachedModelError, match=match) as err:
        call()
    assert "\n" not in str(err.value) and "detach first: runtime.detach()" in str(err.value)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_experts_switch_is_refused_and_detach_lifts_it():
    model = make_model("mixtral")
    ids = prompt(2, 5)
    expected = _logits(model, ids)
    runtime = _attach(model)
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        _refused(lambda impl=implementation: model.set_experts_implementation(impl), "moe-prefetch runtime")
    _refused(lambda: model.model.set_experts_implementation("eager"), "moe-prefetch runtime")
    model.set_experts_implementation("moe_prefetch")  # no change: allowed
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)
    runtime.detach()
    assert not any("set_experts_implementation" in m.__dict__ or "_apply" in m.__dict__ for m in model.modules())
    assert not any(m._state_dict_hooks for m in model.modules())
    model.set_experts_implementation("eager")
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("predictor", ["none", "next-gate"])
def test_forward_with_grad_works_backward_is_refused(predictor):
    model = make_model("qwen2_moe")
    ids = prompt(1, 5)
    expected = model(ids).logits  # grad enabled, as most users call it
    with torch.no_grad():
        expected_tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    _attach(model, predictor=predictor, lookahead=2)
    logits = model(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert logits.requires_grad  # the graph reaches the experts, so a backward meets the refusal
    _refused(lambda: logits.sum().backward(), "inference only")
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), expected_tokens)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v2"])
def test_state_dict_holds_the_full_experts(arch):
    model = make_model(arch)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    runtime = _attach(model)
    assert all(p.numel() == 0 for p in find_moe_layers(model)[0].experts.parameters())
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    runtime.detach()


@pytest.mark.parametrize("arch", ["gpt_oss", "mixtral"])
def test_save_pretrained_round_trips(arch, tmp_path):
    model = make_model(arch)
    ids = prompt(2, 5)
    expected = _logits(model, ids)
    runtime = _attach(model, predictor="next-gate")
    model.save_pretrained(tmp_path)
    runtime.detach()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert all(p.numel() > 0 for p in reloaded.parameters())
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=0)


def test_dtype_and_device_changes_are_refused():
    model = make_model("olmoe")
    ids = prompt(1, 5)
    expected = _logits(model, ids)
    runtime = _attach(model)
    for convert in (
        lambda: model.to(torch.bfloat16),
        lambda: model.to(dtype=torch.float16),
        lambda: model.to("cpu", torch.bfloat16),
        lambda: model.half(),
        lambda: model.bfloat16(),
        lambda: model.double(),
        lambda: model.model.to(torch.bfloat16),
        lambda: model.model.layers[0].half(),
        lambda: model.to("meta"),
    ):
        _refused(convert, "moe-prefetch runtime holds this model's experts as float32 on cpu")
    model.to(torch.float32).float().to("cpu")  # no change: allowed
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)
    runtime.detach()
    model.to(torch.bfloat16)  # the model's own again
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def _decode(model, config, ids, steps, after_warmup=None):
    """Greedy decode by hand (one forward per token), so a compiled model sees one token at a time."""
    cache = DynamicCache(config=config)
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True)
        logits.append(out.logits)
        for step in range(steps):
            if step == 2 and after_warmup is not None:
                after_warmup()
            out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
            logits.append(out.logits)
    return logits


@pytest.mark.slow
def test_compile_breaks_at_the_runtime_and_does_not_recompile():
    from torch._dynamo.utils import counters

    model = make_model("mixtral")
    ids = prompt(1, 5)
    expected = _decode(model, model.config, ids, 5)
    runtime = _attach(model, predictor="next-gate", lookahead=2)
    torch._dynamo.reset()
    frames = {}
    # Without the guards dynamo guards on the runtime's Python state and recompiles at every token
    # until it hits its recompile limit and silently falls back to eager: lift the limit to see it.
    with torch._dynamo.config.patch(recompile_limit=1000, accumulated_recompile_limit=100000):
        compiled = torch.compile(model, backend="eager")
        # steps 0 and 1 compile (prefill, then decode with dynamic shapes); later steps reuse them
        got = _decode(compiled, model.config, ids, 5, after_warmup=lambda: frames.update(counters["frames"]))
    assert counters["frames"] == frames, "dynamo recompiled after warm-up"
    for step, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"step {step}")
    runtime.detach()
    torch._dynamo.reset()
