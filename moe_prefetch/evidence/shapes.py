"""The five reference shapes: real models' public configs, built with random weights.

`SHAPES` holds each model's config.json numbers (the `hub` entry names it on the Hugging Face
hub). `shape_config` gives the real one (depth, vocabulary, tying, attention layer types) for
sizing and the simulator (`anatomy`), or a CPU-runnable one with a small vocabulary;
`shape_model` builds that with random weights for the measured bench.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Public configs of the five reference shapes (each model's config.json on the Hugging Face hub,
# `hub` below): real widths, depths, vocabularies and tying. `shape_model` builds them with fewer
# layers and a small vocabulary so a CPU can run them; their weights are random, so their routing
# is random: say so next to every number they give. Sizing and the simulator use the real ones.
SHAPES = {
    "mixtral-8x7b": dict(
        model_type="mixtral",
        hub="mistralai/Mixtral-8x7B-v0.1",
        hidden_size=4096,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
        real_layers=32,
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        hub="Qwen/Qwen3-30B-A3B",
        hidden_size=2048,
        moe_intermediate_size=768,
        intermediate_size=6144,
        num_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
        real_layers=48,
    ),
    "olmoe-1b-7b": dict(
        model_type="olmoe",
        hub="allenai/OLMoE-1B-7B-0924",
        hidden_size=2048,
        intermediate_size=1024,
        num_experts=64,
        num_experts_per_tok=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=50304,
        tie_word_embeddings=False,
        real_layers=16,
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2",
        hub="deepseek-ai/DeepSeek-V2-Lite",
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        num_attention_heads=16,
        num_key_value_heads=16,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        topk_method="greedy",
        vocab_size=102400,
        tie_word_embeddings=False,
        real_layers=27,
    ),
    "gpt-oss-20b": dict(
        model_type="gpt_oss",
        hub="openai/gpt-oss-20b",
        hidden_size=2880,
        intermediate_size=2880,
        num_local_experts=32,
        num_experts_per_tok=4,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        sliding_window=128,
        vocab_size=201088,
        tie_word_embeddings=False,
        real_layers=24,
    ),
}
# The vocabulary of the models `shape_model` runs on a CPU (the real ones' heads would dominate).
RUN_VOCAB = 4096


def shape_config(name: str, layers: int = 2, real: bool = False):
    """The named shape's transformers config with `layers` decoder layers: with `real`, its real
    vocabulary, tying and attention layer types (GPT-OSS alternates sliding and full attention),
    as sizing needs; otherwise a small vocabulary and full attention, as `shape_model` runs."""
    spec = dict(SHAPES[name])
    model_type = spec.pop("model_type")
    spec.pop("real_layers")
    spec.pop("hub")
    if not real:
        spec.update(vocab_size=RUN_VOCAB, tie_word_embeddings=False)
    extra = {}
    if model_type == "gpt_oss":
        kinds = ("sliding_attention", "full_attention") if real else ("full_attention", "full_attention")
        extra["layer_types"] = [kinds[i % 2] for i in range(layers)]
    positions = 131072 if real else 512
    return AutoConfig.for_model(
        model_type, num_hidden_layers=layers, max_position_embeddings=positions, **spec, **extra
    )


def shape_model(name: str, layers: int = 2, dtype=torch.bfloat16, seed: int = 0):
    """A random-weight model with the named shape's real expert size and `layers` layers."""
    config = shape_config(name, layers)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return model
