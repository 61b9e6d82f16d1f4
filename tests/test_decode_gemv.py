"""One-row decode steps on a CPU device run with oneDNN off (model/decode_gemv.py): the flag is
off inside a decode forward only, back after (exceptions too), prefill and fp32 left alone,
outputs equal stock's within bf16 rounding."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import make_model, prompt

import moe_prefetch
from moe_prefetch.errors import ConfigError
from moe_prefetch.model import decode_gemv
from moe_prefetch.runtime.config import RuntimeConfig


def _spy(model) -> tuple[list[bool], object]:
    """Records the oneDNN flag as the first decoder layer sees it, per forward."""
    seen: list[bool] = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(torch._C._get_mkldnn_enabled()))
    return seen, handle


def test_a_decode_step_runs_without_onednn_and_a_prefill_with_it():
    model = make_model("qwen3_moe").to(torch.bfloat16)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4, on_miss="host")
    seen, handle = _spy(model)
    try:
        assert torch._C._get_mkldnn_enabled()
        with torch.no_grad():
            out = model(prompt(length=6), use_cache=True)  # prefill: 6 rows
            model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
            model(prompt(batch=2, length=1))  # a batch of 2: two rows, oneDNN's
        assert seen == [True, False, True]
        assert torch._C._get_mkldnn_enabled(), "restored after the decode step"
        stats = runtime.stats()
        assert stats["decode_gemv"] is True and stats["decode_gemv_steps"] == 1
        assert stats["decode_gemv_reason"].startswith("on: CPU device, bfloat16")
    finally:
        handle.remove()
        runtime.detach()
    assert "forward" not in model.__dict__, "detach takes the wrapper off"


def test_the_flag_comes_back_after_an_exception_in_a_decode_step():
    model = make_model("mixtral").to(torch.bfloat16)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4, on_miss="host")

    def boom(module, args):
        assert not torch._C._get_mkldnn_enabled()
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
            model(prompt(length=1))
        assert torch._C._get_mkldnn_enabled()
    finally:
        handle.remove()
        runtime.detach()


def test_a_user_who_turned_onednn_off_keeps_it_off():
    model = make_model("mixtral").to(torch.bfloat16)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4, on_miss="host")
    torch._C._set_mkldnn_enabled(False)
    try:
        with torch.no_grad():
            model(prompt(length=1))
        assert not torch._C._get_mkldnn_enabled()
    finally:
        torch._C._set_mkldnn_enabled(True)
        runtime.detach()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_bf16_greedy_decode_equals_stock_with_onednn_off(arch):
    """Tokens equal, logits within bf16 rounding of the stock model (oneDNN on, experts resident)."""
    stock = make_model(arch).to(torch.bfloat16)
    model = make_model(arch).to(torch.bfloat16)
    ids = prompt(length=6)
    greedy = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = stock.generate(ids, **greedy)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4, on_miss="host")
    try:
        with torch.no_grad():
            got = model.generate(ids, **greedy)
        assert runtime.stats()["decode_gemv_steps"] == 7  # every step after the prompt's
    finally:
        runtime.detach()
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_fp32_models_and_the_setting_off_are_left_alone():
    fp32 = make_model("mixtral")
    runtime = moe_prefetch.attach(fp32, device="cpu", cache_slots=4)
    try:
        assert "forward" not in fp32.__dict__ or not fp32.forward.__name__.startswith("decode_gemv")
        stats = runtime.stats()
        assert stats["decode_gemv"] is False and stats["decode_gemv_reason"].startswith("off: float32")
    finally:
        runtime.detach()
    model = make_model("mixtral").to(torch.bfloat16)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4, cpu_decode_gemv=False)
    seen, handle = _spy(model)
    try:
        with torch.no_grad():
            model(prompt(length=1))
        assert seen == [True]
        assert runtime.stats()["decode_gemv_reason"] == "off: cpu_decode_gemv=False (oneDNN as torch sets it)"
    finally:
        handle.remove()
        runtime.detach()


def test_choose_names_why():
    on = decode_gemv.choose(True, torch.device("cpu"), torch.bfloat16)
    assert on.enabled
    assert not decode_gemv.choose(True, torch.device("cuda"), torch.bfloat16).enabled
    assert "cuda" in decode_gemv.choose(True, torch.device("cuda"), torch.bfloat16).reason


def test_overlapping_windows_restore_the_flag_once():
    """Two forwards in flight (serve's threads): the last one out restores the flag."""
    assert torch._C._get_mkldnn_enabled()
    decode_gemv._enter()
    decode_gemv._enter()
    decode_gemv._leave()
    assert not torch._C._get_mkldnn_enabled(), "one forward still in its window"
    decode_gemv._leave()
    assert torch._C._get_mkldnn_enabled()
    threads = [threading.Thread(target=lambda: (decode_gemv._enter(), decode_gemv._leave())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch._C._get_mkldnn_enabled()


def test_the_setting_is_validated():
    with pytest.raises(ConfigError, match="cpu_decode_gemv='yes' must be True or False"):
        RuntimeConfig(cpu_decode_gemv="yes")
