"""Issue 20, item 8: the pool is sized after a reserve for what the run allocates beside it (the
KV cache of its longest sequence in the model's own geometry, the prefill's activations, cuBLAS's
workspaces), and an out-of-memory error in a forward names the setting to change. The figures
below are worked out by hand from public configs."""

from types import SimpleNamespace as NS

import pytest
import torch
from tiny_models import make_model, prompt

import moe_prefetch
from moe_prefetch.errors import CacheCapacityError
from moe_prefetch.evidence.bench import SHAPES, shape_config
from moe_prefetch.experts.layout import ExpertSpec, decoder_layers
from moe_prefetch.model.integration import resolve_slots
from moe_prefetch.runtime import sizing
from moe_prefetch.runtime.config import RuntimeConfig

GiB = 2**30


@pytest.mark.parametrize(
    "shape, per_token",
    [
        ("qwen3-30b-a3b", 48 * 2 * 4 * 128 * 2),  # layers x (K, V) x kv heads x head_dim x bf16 = 98,304
        ("mixtral-8x7b", 32 * 2 * 8 * (4096 // 32) * 2),  # head_dim = hidden / heads = 128: 131,072
        ("olmoe-1b-7b", 16 * 2 * 16 * (2048 // 16) * 2),  # 131,072
        ("deepseek-v2-lite", 27 * (512 + 64) * 2),  # MLA: the latent (kv_lora_rank) + rotary key: 31,104
    ],
)
def test_kv_cache_of_the_reference_shapes(shape, per_token):
    config = shape_config(shape, SHAPES[shape]["real_layers"])
    assert sizing.kv_cache_bytes(config, 2, 1) == per_token
    assert sizing.kv_cache_bytes(config, 2, 4096) == 4096 * per_token  # Qwen3-30B-A3B: 384 MiB


def test_sliding_linear_and_indexed_layers():
    """GPT-OSS-20B's pattern: sliding (128 tokens) and full layers alternate; a linear-attention
    layer holds a state that does not grow; an indexed layer adds its indexer's key."""
    base = dict(num_attention_heads=64, num_key_value_heads=8, head_dim=64, hidden_size=2880, sliding_window=128)
    gpt_oss = NS(**base, num_hidden_layers=24, layer_types=["sliding_attention", "full_attention"] * 12)
    per_layer = 2 * 8 * 64 * 2  # 2,048 bytes per token
    assert sizing.kv_cache_bytes(gpt_oss, 2, 100) == 24 * 100 * per_layer
    assert sizing.kv_cache_bytes(gpt_oss, 2, 4096) == 12 * 128 * per_layer + 12 * 4096 * per_layer
    hybrid = NS(**base, num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2)
    assert sizing.kv_cache_bytes(hybrid, 2, 1000) == 2 * 1000 * per_layer
    dsa = NS(num_attention_heads=4, kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128, num_hidden_layers=2)
    assert sizing.kv_cache_bytes(dsa, 2, 10) == 2 * 10 * (512 + 64) * 2  # no indexed layer named
    dsa.layer_types = ["indexed_attention"] * 2
    assert sizing.kv_cache_bytes(dsa, 2, 10) == 2 * 10 * (512 + 64 + 128) * 2


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "jamba", "mimo_v2_flash"])
def test_kv_cache_covers_what_transformers_caches(arch):
    """Against the cache transformers really fills (CPU, fp32): equal for plain, MLA and hybrid
    layers; at most the sliding window's one extra token above it; never below. MiMo-V2-Flash's
    sliding layers have twice the key/value heads of its config: read from the projections."""
    model = make_model(arch)
    widths = sizing.kv_widths(decoder_layers(model))
    for tokens in (3, 12):
        with torch.no_grad():
            cache = model(prompt(1, tokens), use_cache=True).past_key_values
        held = sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for t in vars(layer).values()
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point
        )
        reserved = sizing.kv_cache_bytes(model.config, 4, tokens, widths)
        window = getattr(model.config, "sliding_window", None) or 0
        slack = 2 * max(widths, key=lambda w: w or 0) * 4 * len(widths) if window else 0
        assert held <= reserved <= held + slack, (tokens, held, reserved)


def _small_config(**extra):
    return NS(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=100,
        num_hidden_layers=2,
        max_position_embeddings=512,
        **extra,
    )


def test_prefill_peak_by_hand():
    """10 tokens, hidden 64, 4 heads (2 for keys and values) of 16, top-2 of experts with an
    intermediate of 32, vocabulary 100, bf16:
      hidden-state copies 4 x 10 x 64 x 2                          =  5,120
      attention projections 10 x ((4 + 2 x 2) x 16 + 64) x 2       =  3,840
      experts 20 pairs x (2 x 64 x 4 + 3 x 32 x 2) + 3 x 10 x 64 x 4 = 21,760
      last-token logits 2 x 100 x 4                                 =    800"""
    assert sizing.prefill_bytes(_small_config(), 10, 2, 2, 3 * 64 * 32) == 31_520
    eager = _small_config(_attn_implementation="eager")  # + scores and probabilities 2 x 4 x 10 x 10 x 4
    assert sizing.prefill_bytes(eager, 10, 2, 2, 3 * 64 * 32) == 31_520 + 3_200


def test_pool_is_sized_after_the_reserve():
    """2 GiB free; reserve = KV 2 layers x 10 tokens x 128 bytes (2,560) + prefill 31,520 + cuBLAS
    64 MiB = 67,142,944; 95% of the rest is 1,976,323,668 bytes, less two working slots of
    12,288: 160,831 slots. Before issue 20 the pool took 85% of free memory, reserving nothing."""
    spec = ExpertSpec(names=("w",), shapes=((3 * 64 * 32,),), dtype=torch.bfloat16)
    layers = [NS(layer_idx=i, top_k=2, num_experts=100_000) for i in range(2)]
    config = RuntimeConfig(device="cpu", max_length=10)
    held = sizing.reserve(_small_config(), 2, 2, spec.numel, max_length=10)
    assert (held.kv_cache, held.prefill, held.workspace, held.total) == (2_560, 31_520, 64 * 2**20, 67_142_944)
    slots = resolve_slots(config, spec, layers, torch.device("cpu"), free_bytes=2 * GiB, model_config=_small_config())
    assert slots == 160_831
    # the default length: the model's context (512 here), at most 4096
    assert sizing.reserve(_small_config(), 2, 2, spec.numel).max_length == 512
    with pytest.raises(CacheCapacityError, match=r"lower max_length \(now 10\) or max_batch"):
        resolve_slots(config, spec, layers, torch.device("cpu"), free_bytes=held.total, model_config=_small_config())


def test_max_length_and_max_batch_are_checked():
    with pytest.raises(Exception, match="max_length=0 must be a positive number"):
        RuntimeConfig(max_length=0)
    with pytest.raises(Exception, match="max_batch=0 must be a positive number"):
        RuntimeConfig(max_batch=0)


def test_out_of_memory_in_generate_names_the_setting():
    """An out-of-memory error inside a forward of the attached model (here raised by the expert
    kernel) becomes one CacheCapacityError naming the setting to lower; detach restores forward."""
    model = make_model("mixtral")
    forward = model.forward
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    runtime.kernel = out_of_memory
    ids = prompt(1, 5)
    with pytest.raises(CacheCapacityError, match=r"out of device memory .* lower cache_slots \(now 4\)"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    runtime.detach()
    assert "forward" not in model.__dict__ and model.forward == forward


def test_out_of_memory_when_sized_automatically_names_max_length():
    model = make_model("mixtral")
    runtime = moe_prefetch.attach(model, device="cpu", max_length=64)
    try:
        message = moe_prefetch.model.integration.out_of_memory_message(runtime, torch.OutOfMemoryError("no memory"))
        assert "set max_length (the pool was sized for 1 x 64 tokens)" in message and "(no memory)" in message
    finally:
        runtime.detach()


def test_a_prefill_chunk_bounds_the_prefill_reserve():
    """With `prefill_chunk` the reserve holds one chunk's activations, not the whole prompt's
    (what `plan` assumes for `run` and `serve`); eager attention scores still span the context."""
    spec = ExpertSpec(names=("w",), shapes=((3 * 64 * 32,),), dtype=torch.bfloat16)
    whole = sizing.reserve(_small_config(), 2, 2, spec.numel, max_length=400)
    chunked = sizing.reserve(_small_config(), 2, 2, spec.numel, max_length=400, prefill_chunk=10)
    assert chunked.kv_cache == whole.kv_cache
    assert chunked.prefill == sizing.prefill_bytes(_small_config(), 10, 2, 2, spec.numel, context=400) == 31_520
    assert whole.prefill == 40 * (31_520 - 800) + 800  # the per-token parts x 40, the last logits once
    eager = _small_config(_attn_implementation="eager")  # scores and probabilities of 10 queries x 400 keys
    assert sizing.prefill_bytes(eager, 10, 2, 2, spec.numel, context=400) == 31_520 + 2 * 4 * 10 * 400 * 4
    with pytest.raises(Exception, match="prefill_chunk=0 must be a positive number"):
        RuntimeConfig(prefill_chunk=0)


def test_attached_generate_feeds_the_prompt_in_chunks():
    """`prefill_chunk` sets generate's `prefill_chunk_size` while attached (and back on detach):
    no prefill forward reaches the experts with more tokens than the chunk, and the tokens are
    the stock model's, fed whole."""
    stock, model = make_model("qwen3_moe"), make_model("qwen3_moe")
    ids = prompt(1, 11)
    mask = torch.ones_like(ids)
    expected = stock.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    was = model.generation_config.prefill_chunk_size
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=6, prefill_chunk=4, record=True)
    try:
        assert model.generation_config.prefill_chunk_size == 4
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        tokens = [r["tokens"] for r in runtime.trace]
    finally:
        runtime.detach()
    assert torch.equal(got, expected)
    assert max(tokens) == 4 and tokens.count(4) >= 2, tokens  # 11 prompt tokens: chunks of 4, 4, 3
    assert model.generation_config.prefill_chunk_size == was
