"""Tiny random MoE models of every architecture transformers builds with its experts interface.

The list comes from transformers itself: the causal-LM auto mapping, narrowed to the model
types whose modeling file decorates an experts class with `use_experts_implementation`
(`interface_model_types`). Each gets a tiny config: the generic sizes below wherever its
config has the field, then the few per-architecture settings that a 2-layer, 8-expert model
needs (attention kinds, MLA head counts, which layers are sparse). No downloads.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 96
# Applied to every config that has the field (ignored by those that do not).
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    moe_intermediate_size=48,
    shared_expert_intermediate_size=48,
    shared_intermediate_size=48,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    num_experts_per_token=2,
    moe_num_experts=8,
    moe_k=2,
    moe_num_shared_experts=1,
    moe_layer_start_index=0,
    n_shared_experts=1,
    num_shared_experts=1,
    first_k_dense_replace=0,
    num_dense_layers=0,
    mlp_only_layers=[],
    decoder_sparse_step=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    n_group=2,
    topk_group=1,
    num_expert_group=2,
    max_position_embeddings=128,
    sliding_window=4,  # shorter than the test prompts, so sliding layers really slide
    # linear attention, mamba, sparse-attention indexers and router MLPs of the hybrid models
    linear_num_heads=4,
    linear_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    index_n_heads=2,
    index_head_dim=8,
    mamba_num_heads=4,
    mamba_head_dim=16,
    ssm_state_size=8,
    n_groups=1,
    moe_shared_expert_intermediate_size=48,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=8,
    router_hidden_size=16,
    o_lora_rank=16,
    unpadded_vocab_size=VOCAB,
    vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=8,
    global_head_dim=16,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# What a config needs beyond TINY (or instead of it) for a small, working, sparse model.
MLA = dict(num_key_value_heads=4)  # multi-head latent attention: one kv head per query head
OVERRIDES = {
    "mixtral": dict(num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts_per_tok=3),  # an odd top-k somewhere
    "deepseek_v2": dict(MLA, q_lora_rank=None, topk_method="group_limited_greedy"),
    "deepseek_v3": dict(MLA),
    "deepseek_v32": dict(MLA),
    "glm4_moe_lite": dict(MLA),
    "glm_moe_dsa": dict(MLA),
    "axk1": dict(MLA),
    "axk2": dict(MLA),
    "kimi_linear": dict(MLA),
    "bailing_hybrid": dict(MLA),
    "sarvam_mla": dict(MLA),
    "longcat_flash": dict(MLA, zero_expert_num=2),  # zero-computation experts beside the 8 routed ones
    # NVFP4-rounded keys and values need head_dim % 16 == 0; its indexer scores with key head 0's queries
    "kolibri1_1": dict(head_dim=16, index_num_heads=2, index_topk=4, index_pool_size=16, index_compression=4),
    "zaya": dict(num_experts_per_tok=1),  # its config allows top-1 only
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, layer_types=["linear_attention", "full_attention"]),
    "nemotron_h": dict(layer_types=["linear_attention", "moe", "full_attention", "moe"]),
    "dots3_note_text": dict(
        MLA,
        index_head_dim=8,
        index_n_heads=2,
        index_topk=4,
        per_layer_config={  # its second layer's attention, shrunk like the rest
            1: dict(num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, head_dim=16)
            | dict(qk_nope_head_dim=8, v_head_dim=8, qk_rope_head_dim=8)
        },
    ),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0),
    "gemma4_text": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=48),
    "qwen4_exp_text": dict(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2
    ),
}
# Config fields that list one kind per layer: the tiny model takes each kind the default has once.
PER_LAYER_KINDS = ("layer_types",)


def pinned_version(package: str) -> str | None:
    """The exact version constraints.txt (the project's own set-up) installs, or None."""
    for line in (Path(__file__).resolve().parents[1] / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower().replace("_", "-") == package.lower():
            return version.strip()
    return None


def interface_model_types() -> list[str]:
    """Causal-LM model types whose model class is defined in a modeling file that uses
    transformers' experts interface (some types reuse another's class: sarvam_moe is Glm4Moe)."""
    return sorted(t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if _class_uses_interface().get(cls))


@functools.cache
def _class_uses_interface() -> dict[str, bool]:
    """class name -> whether its modeling file decorates an experts class (read, not imported)."""
    out = {}
    for source in (Path(transformers.__file__).parent / "models").glob("*/modeling_*.py"):
        text = source.read_text()
        uses = "@use_experts_implementation" in text
        out.update(dict.fromkeys(re.findall(r"^class (\w+)\(", text, re.M), uses))
    return out


def _has(config, name: str) -> bool:
    try:
        getattr(config, name)
    except AttributeError:
        return False
    except Exception:  # a per-layer attribute: present, but read per layer
        return True
    return True


def tiny_config(model_type: str):
    """A fresh tiny config of `model_type`: a model built from it keeps it as its `config` and
    may change it (`set_experts_implementation`), so no two callers share one."""
    return copy.deepcopy(_tiny_config(model_type))


@functools.cache
def _tiny_config(model_type: str):
    default = AutoConfig.for_model(model_type)
    kwargs = {k: v for k, v in TINY.items() if _has(default, k)}
    if not _has(default, "sliding_window") or not getattr(default, "sliding_window", None):
        kwargs.pop("sliding_window", None)  # a model without a sliding window stays without one
    for name in PER_LAYER_KINDS:
        kinds = getattr(default, name, None)
        if isinstance(kinds, list) and kinds and not isinstance(getattr(type(default), name, None), property):
            distinct = list(dict.fromkeys(kinds))
            kwargs[name] = distinct if len(distinct) > 1 else distinct * 2
            kwargs["num_hidden_layers"] = len(kwargs[name])
    mlp_kinds = getattr(default, "mlp_layer_types", None)
    if isinstance(mlp_kinds, list):  # every layer sparse, cycling through the sparse kinds
        sparse = [k for k in dict.fromkeys(mlp_kinds) if k != "dense"]
        kwargs["mlp_layer_types"] = [sparse[i % len(sparse)] for i in range(kwargs["num_hidden_layers"])]
    kwargs.update(OVERRIDES.get(model_type, {}))
    return AutoConfig.for_model(model_type, **kwargs)


# The architectures the runtime was first built on; the slower per-architecture suites
# (outputs with every predictor) run on these, exactness runs on every interface type.
CLASSIC = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
    "phimoe",
)


def sized_config(model_type: str, **fields):
    """`tiny_config` with some sizes changed (bigger experts for memory tests). Fields that
    others derive from in __init__ must be given together (head_dim is fixed by TINY)."""
    config = tiny_config(model_type)
    for name, value in fields.items():
        setattr(config, name, value)
    return config


def paced_mixtral(intermediate_size: int = 256):
    """The Mixtral the simulator checks and the lane reports are measured on: 4 layers of 8
    experts (262 kB each in fp32), big enough that a paced link and the host lane both show
    (the hybrid check takes 4x wider experts: the one-pass host lane is cheap at 262 kB)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=intermediate_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval()


def make_model(model_type: str, seed: int = 0, config=None):
    """A random tiny model of `model_type` (`config`: a `sized_config` instead of the tiny one)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config or tiny_config(model_type), dtype=torch.float32).eval()
    # Zero-initialised router biases would leave bias-corrected routing untested: give them values,
    # small enough (router scores of a tiny random model differ by ~0.01) that routing still varies.
    with torch.no_grad():
        for name, buffer in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.01)
    return model


def save_model(model_type: str, path, seed: int = 0):
    model = make_model(model_type, seed)
    model.save_pretrained(path)
    return model


def prompt(batch: int = 1, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
