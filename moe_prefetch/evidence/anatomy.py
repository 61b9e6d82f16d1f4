"""A model's anatomy from its config alone: what each part weighs and what a token reads.

Built on the meta device (no weights, no memory), for a checkpoint folder, a shipped demo or a
reference shape (`shapes.SHAPES`, at its real depth, vocabulary and tying). Everything the memory
budget (`fitting`) and the simulator's roofline (`sim.Roofline`) need comes from here, so the two
never disagree about a model:

- non-expert weights: every parameter outside the experts, counted once (tied embeddings are
  one tensor), in the dtype the model runs in on a GPU;
- what a decode token reads outside the experts: each layer's dense weights, and the head as the
  lm_head read plus one embedding row (a token looks up one row, it does not read the table);
- the KV cache per token, layer by layer, as transformers' cache holds it: K and V per key-value
  head (grouped-query attention), MLA's compressed latent plus its rotary key (DeepSeek-V2/V3:
  transformers caches the latent, not the expanded heads), sliding-window layers capped at their
  window; layers without attention (linear attention, Mamba) hold a fixed state, not counted;
- each experts_dtype's bytes per expert: stored (slot, link, host store), and what one host or
  device call touches, decoding included (`expert_traffic`);
- the widest activation of a prefill token (for the prefill chunk's peak).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# The layer types (transformers' `config.layer_types`) that keep a KV cache growing with the
# context, and those capped at a window.
_SLIDING = ("sliding_attention", "chunked_attention", "local_attention")
_FULL = ("full_attention", "attention", "global_attention")


@dataclass(frozen=True)
class Anatomy:
    """One model's byte counts and shapes (see the module docstring)."""

    name: str  # the folder, demo name or shape:NAME it was built from
    model_type: str
    architecture: str
    dtype: str  # the dtype the model runs in on a GPU (non-expert weights, KV, activations)
    itemsize: int
    num_layers: int
    moe_layer_ids: tuple[int, ...]
    experts_per_layer: int
    top_k: int
    expert_params: int  # parameters of one expert (padded as the slot buffer pads them)
    hidden_size: int
    vocab_size: int
    max_positions: int | None  # the longest context the config allows (None: unbounded)
    tied: bool  # lm_head shares the input embedding's tensor
    non_expert_bytes: int  # device memory the weights outside the experts take
    dense_bytes_per_layer: int  # bytes a decode token reads per layer outside the experts (mean)
    head_read_bytes: int  # lm_head read + one embedding row, per decode token
    # Per decoder layer with a KV cache: (bytes per token, window in tokens or None if it grows).
    kv_layers: tuple[tuple[int, int | None], ...]
    prefill_values_per_token: int  # activation values live per token at a prefill layer's peak
    # experts_dtype -> {"bytes": stored, "host_bytes": one host call, "device_bytes": one device call}
    experts: dict[str, dict[str, int]] = field(hash=False, compare=False)

    @property
    def moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def total_experts(self) -> int:
        return self.moe_layers * self.experts_per_layer

    def expert_bytes(self, experts_dtype: str) -> int:
        """Bytes of one expert as stored, moved and held in a slot."""
        return self.experts[self._dtype(experts_dtype)]["bytes"]

    def kv_bytes(self, context: int) -> int:
        """KV cache bytes for `context` tokens (sliding layers hold at most their window)."""
        return sum(per * (context if window is None else min(context, window)) for per, window in self.kv_layers)

    def kv_bytes_per_token(self) -> int:
        """KV bytes one more token adds on the layers whose cache grows with the context."""
        return sum(per for per, window in self.kv_layers if window is None)

    def sim_sizes(self) -> dict:
        """What the simulator needs (`bench.shape_replay`, `sim.simulate_replay`)."""
        return {
            "experts": self.experts,
            "moe_layer_ids": list(self.moe_layer_ids),
            "num_layers": self.num_layers,
            "num_experts": self.experts_per_layer,
            "top_k": self.top_k,
            "expert_params": self.expert_params,
            "itemsize": self.itemsize,
            "dense_bytes_per_layer": self.dense_bytes_per_layer,
            "head_bytes": self.head_read_bytes,
        }

    def _dtype(self, experts_dtype: str) -> str:
        if experts_dtype not in self.experts:
            raise KeyError(f"experts_dtype {experts_dtype!r}; known: {', '.join(self.experts)}")
        return experts_dtype


def kv_layers(config, itemsize: int) -> tuple[tuple[int, int | None], ...]:
    """Per decoder layer with a KV cache: (bytes per token, window or None), from the config.

    Per token a layer caches K and V for each key-value head (`num_key_value_heads` x `head_dim`
    each), or, for MLA (`kv_lora_rank`), the compressed latent and the rotary key part. A layer
    whose type is a sliding or chunked attention keeps its window; a config with a
    `sliding_window` and no `layer_types` slides on every layer unless `use_sliding_window` is
    false. Linear-attention and Mamba layers keep a fixed state and are left out."""
    text = config.get_text_config()
    layers = int(text.num_hidden_layers)
    if getattr(text, "kv_lora_rank", None):
        per_token = (int(text.kv_lora_rank) + int(getattr(text, "qk_rope_head_dim", 0) or 0)) * itemsize
    else:
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        per_token = 2 * kv_heads * head_dim * itemsize
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if not types:
        slides = window is not None and getattr(text, "use_sliding_window", True) is not False
        types = ["sliding_attention" if slides else "full_attention"] * layers
    out = []
    for kind in list(types)[:layers]:
        if kind in _SLIDING and window:
            out.append((per_token, int(window)))
        elif kind in _FULL or kind in _SLIDING:
            out.append((per_token, None))
        # anything else (linear_attention, mamba, conv): a fixed state, not a growing cache
    return tuple(out)


def prefill_values_per_token(config, top_k: int) -> int:
    """Activation values live per prefill token at a layer's widest point: the residual, the
    normed input and the attention output (3 x hidden), the projected queries, keys and values,
    and the wider of the MoE's routed intermediates (gate, up and their product per routed
    expert) and a dense MLP's. Attention scores are not materialised (SDPA's fused kernels)."""
    text = config.get_text_config()
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    moe_inter = int(getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", hidden))
    dense_inter = int(getattr(text, "intermediate_size", None) or moe_inter)
    return 3 * hidden + (heads + 2 * kv_heads) * head_dim + max(3 * top_k * moe_inter, 3 * dense_inter)


def of_model(model, name: str, dtype=None) -> Anatomy:
    """The anatomy of a built model (real or on the meta device), weights counted at `dtype`
    (default: the model's own)."""
    import torch

    from ..experts.compression import make_codec
    from ..experts.dtypes import EXPERTS_DTYPES
    from ..experts.layout import find_moe_layers, spec_of
    from ..experts.native import expected_formats

    config = model.config
    layers = find_moe_layers(model)
    spec = spec_of(layers)
    run_dtype = dtype or spec.dtype
    itemsize = torch.empty((), dtype=run_dtype).element_size()
    scale = itemsize / spec.dtype.itemsize  # the model may be held in another dtype (fp32 on a CPU)
    spec = _respec(spec, run_dtype)
    native = expected_formats(config, spec)
    experts = {}
    for d in EXPERTS_DTYPES:
        experts[d] = expert_traffic(make_codec(spec, d, native), layers[0].experts)
    expert_ids = {id(p) for layer in layers for p in layer.experts.parameters(recurse=False)}
    seen: set[int] = set()
    non_expert = 0
    for p in model.parameters():  # each tensor once: tied embeddings count once
        if id(p) in expert_ids or id(p) in seen:
            continue
        seen.add(id(p))
        non_expert += p.numel() * p.element_size()
    non_expert = int(non_expert * scale)
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    embed = inputs.weight
    head = outputs.weight if outputs is not None else embed
    tied = head is embed
    tables = embed.numel() * embed.element_size() + (0 if tied else head.numel() * head.element_size())
    table_bytes = int(tables * scale)
    row_bytes = embed.shape[-1] * itemsize
    text = config.get_text_config()
    num_layers = int(getattr(text, "num_hidden_layers", len(layers)))
    return Anatomy(
        name=name,
        model_type=str(getattr(config, "model_type", "?")),
        architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
        dtype=str(run_dtype).removeprefix("torch."),
        itemsize=itemsize,
        num_layers=num_layers,
        moe_layer_ids=tuple(layer.layer_idx for layer in layers),
        experts_per_layer=max(layer.num_experts for layer in layers),
        top_k=max(layer.top_k for layer in layers),
        expert_params=spec.numel,
        hidden_size=int(text.hidden_size),
        vocab_size=int(embed.shape[0]),
        max_positions=getattr(text, "max_position_embeddings", None),
        tied=tied,
        non_expert_bytes=non_expert,
        dense_bytes_per_layer=(non_expert - table_bytes) // num_layers,
        head_read_bytes=int(head.numel() * itemsize + row_bytes),
        kv_layers=kv_layers(config, itemsize),
        prefill_values_per_token=prefill_values_per_token(config, max(layer.top_k for layer in layers)),
        experts=experts,
    )


def _respec(spec, dtype):
    import dataclasses

    return spec if spec.dtype == dtype else dataclasses.replace(spec, dtype=dtype)


def of_config(config, name: str, dtype) -> Anatomy:
    """Build `config` on the meta device in `dtype` and measure it (no weights, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..errors import UnsupportedModelError

    with init_empty_weights():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as err:
            raise UnsupportedModelError(f"transformers cannot build this model: {str(err).splitlines()[0]}") from None
    model.tie_weights()  # accelerate's empty init leaves tied tensors apart; the real model shares them
    return of_model(model, name)


@functools.cache
def anatomy(model: str) -> Anatomy:
    """The anatomy of `model`: a checkpoint folder, 'demo'/'demo-fine', or 'shape:NAME' (a
    reference shape at its real depth, vocabulary and tying). Cached per process."""
    import torch

    if model.startswith("shape:"):
        from ..errors import ConfigError
        from .shapes import SHAPES, shape_config

        name = model.split(":", 1)[1]
        if name not in SHAPES:
            raise ConfigError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
        return of_config(shape_config(name, SHAPES[name]["real_layers"], real=True), model, torch.bfloat16)
    from ..model.folders import default_dtype, read_config, resolve_path

    folder = resolve_path(model)
    config = read_config(folder)
    return of_config(config, str(model), default_dtype(config, torch.device("cuda"), None))  # as load() on a GPU


def expert_traffic(codec, experts_module=None) -> dict:
    """Per-expert bytes of a codec for the simulator: what the link moves (`bytes`), what a
    host-lane call costs (`host_bytes`: the stored bytes at each kernel's cost per byte where the
    host lane's kernels read them, else the decode's traffic too) and what a device call touches
    (`device_bytes`: the stored bytes, plus the single-pass decode's traffic when compressed)."""
    from ..experts.host_kernels import host_bytes

    return {
        "bytes": codec.nbytes,
        "host_bytes": codec.host_bytes if experts_module is None else host_bytes(codec, experts_module),
        "device_bytes": codec.device_bytes,
    }
