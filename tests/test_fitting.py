"""What fits where, against figures worked out here by hand from the models' public configs
(config.json of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-30B-A3B) and the RTX 3060 profile,
never by calling the code under test; and the host's memory."""

from __future__ import annotations

import dataclasses

import pytest

from moe_prefetch.errors import ConfigError
from moe_prefetch.evidence.anatomy import anatomy
from moe_prefetch.evidence.fitting import fit, parse_bytes, parse_cache, stores_that_fit
from moe_prefetch.runtime import profiles as hw

BF16 = 2
RTX3060_USABLE = int(12288 * 2**20 * 0.85)  # 12288 MiB per nvidia-smi, usable_fraction 0.85
CONTEXT = 4096
CHUNK = 512  # tokens of one prefill chunk


def mixtral_by_hand() -> dict:
    """Mixtral-8x7B: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads of 128,
    8 experts top-2, vocabulary 32000, untied head; RMSNorm weights only, no biases."""
    h, inter, layers, heads, kv, hd, experts, top_k, vocab = 4096, 14336, 32, 32, 8, 128, 8, 2, 32000
    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h  # q, k, v, o
    per_layer = attention + experts * h + 2 * h  # + router + two norms
    weights = (2 * vocab * h + layers * per_layer + h) * BF16  # embeddings, lm_head, layers, final norm
    expert = 3 * h * inter * BF16  # gate, up, down
    kv_bytes = layers * 2 * kv * hd * BF16 * CONTEXT
    work = top_k * expert  # the working buffer: one layer's routed experts
    prefill = CHUNK * (3 * h + (heads + 2 * kv) * hd + 3 * top_k * inter) * BF16 + 2 * 4 * vocab
    return dict(weights=weights, expert=expert, kv=kv_bytes, work=work, prefill=prefill, total=layers * experts)


def qwen3_by_hand() -> dict:
    """Qwen3-30B-A3B: hidden 2048, 48 layers, 32 heads and 4 KV heads of 128 (q/k norms of 128),
    128 experts of intermediate 768, top-8, vocabulary 151936, untied head."""
    h, moe_inter, layers, heads, kv, hd, experts, top_k, vocab = 2048, 768, 48, 32, 4, 128, 128, 8, 151936
    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 2 * hd
    per_layer = attention + experts * h + 2 * h
    weights = (2 * vocab * h + layers * per_layer + h) * BF16
    expert = 3 * h * moe_inter * BF16
    kv_bytes = layers * 2 * kv * hd * BF16 * CONTEXT
    work = top_k * expert
    prefill = CHUNK * (3 * h + (heads + 2 * kv) * hd + 3 * top_k * moe_inter) * BF16 + 2 * 4 * vocab
    return dict(weights=weights, expert=expert, kv=kv_bytes, work=work, prefill=prefill, total=layers * experts)


@pytest.mark.parametrize(
    "shape, hand, gb, slots",
    [
        # 3.21 GB of weights, 0.54 GB of KV: 18 bf16 experts of 352 MB in what is left of 10.95 GB
        ("mixtral-8x7b", mixtral_by_hand, 3.21, 18),
        # 3.08 GB of weights (a 311M-parameter vocabulary, twice), 0.40 GB of KV: 779 experts of 9.4 MB
        ("qwen3-30b-a3b", qwen3_by_hand, 3.08, 779),
    ],
)
def test_fit_on_the_rtx3060_matches_the_hand_count(shape, hand, gb, slots):
    want = hand()
    body = anatomy(f"shape:{shape}")
    sized = fit(body, "bf16", hw.load_profile("rtx3060-12gb"), context=CONTEXT)
    assert sized.usable_bytes == RTX3060_USABLE
    assert sized.weights_bytes == want["weights"] and round(want["weights"] / 1e9, 2) == gb
    assert sized.kv_bytes == want["kv"]
    assert sized.work_bytes == want["work"]
    assert sized.prefill_bytes == want["prefill"]
    assert sized.slot_bytes == want["expert"]
    free = RTX3060_USABLE - want["weights"] - want["kv"] - want["work"] - want["prefill"]
    assert sized.max_slots == sized.cache_slots == free // want["expert"] == slots
    assert sized.device_bytes == RTX3060_USABLE - free + slots * want["expert"] <= RTX3060_USABLE
    assert sized.host_bytes == want["total"] * want["expert"]
    assert sized.fits  # no host named: the device alone decides


def test_a_longer_context_leaves_fewer_slots_and_sliding_layers_stop_growing():
    qwen = anatomy("shape:qwen3-30b-a3b")
    card = hw.load_profile("rtx3060-12gb")
    short, long = fit(qwen, "bf16", card, context=4096), fit(qwen, "bf16", card, context=32768)
    assert long.kv_bytes == 8 * short.kv_bytes and long.max_slots < short.max_slots
    # GPT-OSS-20B alternates 128-token sliding layers with full ones: 12 of 24 layers grow, 8 KV heads of 64
    gpt = anatomy("shape:gpt-oss-20b")
    per_token = 2 * 8 * 64 * BF16
    assert gpt.kv_bytes(4096) == 12 * per_token * 4096 + 12 * per_token * 128
    # DeepSeek-V2-Lite caches MLA's latent (512) and rotary key (64), per layer, not 16 expanded heads
    assert anatomy("shape:deepseek-v2-lite").kv_bytes_per_token() == 27 * (512 + 64) * BF16


def test_the_head_reads_the_lm_head_and_one_embedding_row():
    qwen = anatomy("shape:qwen3-30b-a3b")
    assert qwen.head_read_bytes == 151936 * 2048 * BF16 + 2048 * BF16 and not qwen.tied
    assert qwen.vocab_size == 151936


def test_a_tied_head_counts_once():
    """The shipped demo (config.json: hidden 256, 6 layers, 8 heads, 4 KV heads, 8 experts,
    vocabulary 4096, tie_word_embeddings true, float16): its embedding is its head."""
    h, layers, heads, kv, experts, vocab = 256, 6, 8, 4, 8, 4096
    hd = h // heads
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + experts * h + 2 * h
    demo = anatomy("demo")
    assert demo.tied and demo.non_expert_bytes == (vocab * h + layers * per_layer + h) * 2
    assert demo.head_read_bytes == vocab * h * 2 + h * 2


def test_a_share_of_the_fitting_cache_and_a_what_if():
    body = anatomy("shape:mixtral-8x7b")
    card = hw.load_profile("rtx3060-12gb")
    half = fit(body, "int4", card, cache=0.5)
    assert half.cache_slots == half.max_slots // 2 and half.fits
    # The old default: a quarter of bf16 experts' memory (22.5 GB) on a 12 GB card does not fit, and says so.
    what_if = fit(body, "bf16", card, cache_fraction=0.25)
    assert what_if.what_if and what_if.cache_slots == 64 and not what_if.fits
    assert "64 bf16 slots" in what_if.why_not


def test_the_host_must_hold_the_store():
    body = anatomy("shape:mixtral-8x7b")
    desktop = hw.load_host_profile("ddr4-3200-2ch")  # 32 GiB, three quarters pinnable
    card = hw.load_profile("rtx3060-12gb")
    assert desktop.memory_bytes == 32 * 2**30 and desktop.pinnable_fraction == 0.75
    bf16 = fit(body, "bf16", card, desktop)
    assert bf16.fits_device and not bf16.fits and bf16.host_bytes == 256 * 3 * 4096 * 14336 * BF16
    assert "host ddr4-3200-2ch" in bf16.why_not and "24.0 GiB" in bf16.why_not
    assert stores_that_fit(body, desktop) == ["int4"]  # 23.6 GiB of int4 experts
    assert stores_that_fit(body, desktop, host_memory=64 * 2**30) == ["int8", "int4"]
    assert fit(body, "int8", card, desktop, host_memory=64 * 2**30).fits
    # Unified memory: the device part comes out of the same DRAM as the store.
    jetson = hw.load_host_profile("jetson-unified")
    orin = hw.load_profile("jetson-agx-orin-64gb")
    shared = fit(body, "int4", orin, jetson)
    assert shared.host_capacity == int(jetson.memory_bytes * jetson.pinnable_fraction) - shared.device_bytes


def test_every_shipped_host_profile_carries_its_memory():
    for host in hw.list_host_profiles():
        assert host.memory_bytes >= 32 * 2**30 and 0 < host.pinnable_fraction <= 1
        assert "ESTIMATE" in host.sources["framework_layer_s"] or "MEASURED" in host.sources["framework_layer_s"]
        assert host.framework_layer_s > host.runtime_layer_s > 0


@pytest.mark.parametrize("value, expected", [("64GB", 64 * 10**9), ("32GiB", 32 * 2**30), ("1000", 1000)])
def test_host_memory_sizes_parse(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("bad", ["lots", "-4GB", "0"])
def test_bad_host_memory_and_cache_are_one_line(bad):
    with pytest.raises(ConfigError, match="--host-memory"):
        parse_bytes(bad)
    with pytest.raises(ConfigError, match="--cache"):
        parse_cache(bad)


def test_a_context_beyond_the_model_is_clamped_to_it():
    demo = anatomy("demo")  # max_position_embeddings 512
    sized = fit(demo, "auto", hw.load_profile("h200"), context=100_000)
    assert sized.context == 512 and sized.kv_bytes == demo.kv_bytes(512)
    assert dataclasses.replace(sized, cache_slots=1).fits_device is False  # below top_k
