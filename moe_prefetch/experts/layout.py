"""Where the experts are in a transformers model.

`ExpertSpec` is the per-expert layout shared by the host store and the device pool: the
model's fused expert parameters without their leading expert dimension, packed into one
flat buffer per expert (each piece aligned to 64 elements so device views stay aligned).
`find_moe_layers` locates the experts modules through transformers' experts-implementation
interface (`checkpoint.Checkpoint` reads them from disk).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError

logger = logging.getLogger(__name__)

# Every model type tests/test_exactness.py::test_load_matches_stock runs exact with eviction, most used first.
SUPPORTED = tuple(
    """
    mixtral qwen2_moe qwen3_moe olmoe deepseek_v2 deepseek_v3 gpt_oss granitemoe phimoe afmoe aria_text
    axk1 axk2 bailing_hybrid beam cohere2_moe deepseek_v32 deepseek_v4 dots1 dots3_note_text
    ernie4_5_moe exaone_moe flex_olmo flint gemma4_text glm4_moe glm4_moe_lite glm_moe_dsa
    granitemoe_swa granitemoehybrid granitemoeshared hunyuan_v1_moe hy_v3 hy_v4 inkling2_loop_text
    inkling2_text inkling_text jamba kimi_linear kolibri1 laguna lara_mini lfm2_moe mellum mimo_v2_flash
    minimax minimax_m2 minimax_m3_vl_text nemotron_h qwen3_5_moe_text qwen3_next qwen4_exp_text
    sarvam_mla sarvam_moe solar_open zaya ergo kolibri1_1 longcat_flash minicpm5_moe param2moe
    """.split()
)

_ALIGN = 64  # elements; keeps every parameter view 256-byte aligned in fp32, 128 in bf16


@dataclass(frozen=True)
class ExpertSpec:
    """Per-expert parameter shapes, in the order they are packed in one flat buffer."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @property
    def offsets(self) -> tuple[int, ...]:
        offsets, pos = [], 0
        for shape in self.shapes:
            offsets.append(pos)
            pos += _round_up(math.prod(shape))
        return tuple(offsets)

    @property
    def numel(self) -> int:
        return sum(_round_up(math.prod(shape)) for shape in self.shapes)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a `[..., numel]` buffer into named parameter views `[..., *shape]`."""
        lead = flat.shape[:-1]
        return {
            name: flat[..., off : off + math.prod(shape)].view(*lead, *shape)
            for name, shape, off in zip(self.names, self.shapes, self.offsets)
        }


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class MoELayer:
    """One decoder layer's sparse block, as the runtime and the predictors see it."""

    layer_idx: int
    path: str  # module path of the experts module
    experts: nn.Module
    router: nn.Module | None
    norm: nn.Module | None  # the norm that precedes the router (post_attention_layernorm)
    decoder_layer: nn.Module
    num_experts: int
    top_k: int


def undecorated_forward(cls: type) -> Callable | None:
    """The forward that transformers' `use_experts_implementation` wrapped on `cls` or on a
    base class (a subclass may call the decorated forward from its own: ergo's experts add a
    per-expert norm around it), or None where no class in the MRO was decorated."""
    for klass in cls.__mro__:
        wrapped = getattr(klass.__dict__.get("forward"), "__wrapped__", None)
        if wrapped is not None:
            return wrapped
    return None


def is_experts_module(module: nn.Module) -> bool:
    """True for modules whose class (or a base class) transformers' `use_experts_implementation` decorated."""
    return (
        hasattr(module, "has_gate") and hasattr(module, "num_experts") and undecorated_forward(type(module)) is not None
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and any(any(is_experts_module(m) for m in layer.modules()) for layer in module)
        ):
            return module
    raise UnsupportedModelError(_unsupported_message(model))


def _unsupported_message(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    looks_moe = any("expert" in name.lower() for name, _ in model.named_modules())
    if looks_moe:
        return (
            f"model type {model_type!r} has experts but not through transformers' experts interface; "
            f"supported: {', '.join(SUPPORTED)} (and any transformers MoE using use_experts_implementation)"
        )
    return f"model type {model_type!r} is dense: it has no experts to offload; use it with plain transformers"


def _find_router(block: nn.Module, experts: nn.Module) -> nn.Module | None:
    for name in ("gate", "router"):
        child = getattr(block, name, None)
        if isinstance(child, nn.Module) and child is not experts:
            return child
    return None


def _top_k(model: nn.Module, router: nn.Module | None) -> int:
    for source in (router, getattr(model, "config", None)):
        # the names transformers' MoE configs and routers give the number of experts per token
        for attr in ("top_k", "num_experts_per_tok", "num_experts_per_token", "top_k_experts", "moe_k"):
            value = getattr(source, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    raise UnsupportedModelError(
        "cannot tell top_k: neither the router nor the config names num_experts_per_tok (or top_k, top_k_experts)"
    )


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse block of `model`, in layer order. Raises UnsupportedModelError for a
    dense model or one whose experts do not go through the experts interface."""
    layers = decoder_layers(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    found = []
    for layer_idx, decoder_layer in enumerate(layers):
        for block in decoder_layer.modules():
            experts = next((c for c in block.children() if is_experts_module(c)), None)
            if experts is None:
                continue
            router = _find_router(block, experts)
            found.append(
                MoELayer(
                    layer_idx=layer_idx,
                    path=prefix[id(experts)],
                    experts=experts,
                    router=router,
                    norm=getattr(decoder_layer, "post_attention_layernorm", None),
                    decoder_layer=decoder_layer,
                    num_experts=int(experts.num_experts),
                    top_k=_top_k(model, router),
                )
            )
            break
    if not found:
        raise UnsupportedModelError(_unsupported_message(model))
    return found


def spec_of(layers: list[MoELayer]) -> ExpertSpec:
    """The shared per-expert layout. Every MoE layer must have the same one."""
    specs = set()
    for layer in layers:
        params = list(layer.experts.named_parameters(recurse=False))
        specs.add(
            ExpertSpec(
                names=tuple(n for n, _ in params),
                shapes=tuple(tuple(p.shape[1:]) for _, p in params),
                dtype=params[0][1].dtype,
            )
        )
    if len(specs) != 1:
        raise UnsupportedModelError("MoE layers have experts of different shapes; one slot pool cannot serve them")
    return specs.pop()


def dense_bytes(model, layers) -> tuple[int, int]:
    """(bytes a decode token reads per decoder layer outside the experts, bytes it reads in the
    head: the lm_head, plus the one embedding row it looks up). A tied head is one tensor."""
    expert_ids = {id(p) for layer in layers for p in layer.experts.parameters()}
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    head = embed if out is None else out.weight
    tables = {id(embed), id(head)}
    rest = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if id(p) not in expert_ids and id(p) not in tables and not ("embed" in n or "lm_head" in n)
    )
    read = head.numel() * head.element_size() + embed.shape[-1] * embed.element_size()
    return rest // model.config.num_hidden_layers, read
