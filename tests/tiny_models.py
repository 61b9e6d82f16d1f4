"""Tiny random MoE models of every supported architecture, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
DEEPSEEK = dict(
    intermediate_size=64,
    moe_intermediate_size=48,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    num_hidden_layers=3,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    n_group=2,
    topk_group=1,
    num_key_value_heads=4,
)
ARCHS = {
    "mixtral": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
    ),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=3, head_dim=8),
    "olmoe": dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(DEEPSEEK, q_lora_rank=None, topk_method="group_limited_greedy"),
    "deepseek_v3": dict(DEEPSEEK, q_lora_rank=24),
    "gpt_oss": dict(
        intermediate_size=48,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "granitemoe": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
}


def make_model(arch: str, seed: int = 0):
    config = AutoConfig.for_model(arch, **{**COMMON, **ARCHS[arch]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if arch == "deepseek_v3":  # give the sigmoid router's correction bias something to do
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn_like(gate.e_score_correction_bias) * 0.1)
    return model


def save_model(arch: str, path, seed: int = 0):
    model = make_model(arch, seed)
    model.save_pretrained(path)
    return model


def prompt(batch: int = 1, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))
