"""Compressed experts keep the demo model's quality (issue 11, item 5), on a slice of the held-out
windows the predictor tables use: int8 within 0.5% and int4 within 3% of the model's held-out loss.

The demo barely notices weight noise (Gaussian noise of the weights' own size costs it about
1.5%: docs/benchmarks.md, "Compressed experts"), so the loss bars alone would pass a much worse
codec. The codecs' weight error on the demo's real experts is also held to that of textbook
round-to-nearest: int8 per channel, int4 with a zero point at its own group size (32-128, as the
issue asks). A group spanning the whole row, or int4 without a zero point, fails.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_prefetch.experts.compression import compress_experts, make_codec
from moe_prefetch.experts.layout import find_moe_layers, spec_of
from moe_prefetch.model.loading import resolve_path
from moe_prefetch.predict.heldout import heldout_ids, heldout_loss

BARS = {"int8": 0.005, "int4": 0.03}


@pytest.fixture(scope="module")
def demo():
    folder = resolve_path("demo")
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = heldout_ids(AutoTokenizer.from_pretrained(str(folder)), max_tokens=8 * 256)
    return stock, ids, heldout_loss(stock, ids)


def _expert_weights(model) -> list[torch.Tensor]:
    return [p.detach() for layer in find_moe_layers(model) for p in layer.experts.parameters() if p.dim() == 3]


@pytest.mark.parametrize("experts_dtype", ["int8", "int4"])
def test_held_out_loss_within_the_bars(demo, experts_dtype):
    stock, ids, base = demo
    model = compress_experts(copy.deepcopy(stock), experts_dtype)
    assert not all(torch.equal(a, b) for a, b in zip(_expert_weights(model), _expert_weights(stock)))
    rel = heldout_loss(model, ids) / base - 1
    assert abs(rel) <= BARS[experts_dtype], f"{experts_dtype}: held-out loss {rel:+.3%} vs the model's"


def _round_to_nearest(w: torch.Tensor, bits: int, group: int, zero_point: bool) -> torch.Tensor:
    """Textbook quantisation of `w` along its last dimension, in fp32: groups of `group`, scaled
    to [min, max] (zero point) or [-max|w|, max|w|] (none), rounded to 2**bits levels."""
    g = w.float().reshape(*w.shape[:-1], -1, group)
    levels = 2**bits - 1
    if zero_point:
        low = g.amin(-1, keepdim=True)
        scale = (g.amax(-1, keepdim=True) - low).clamp_min(1e-12) / levels
        return (torch.round((g - low) / scale) * scale + low).reshape(w.shape)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / (levels // 2)
    return (torch.round(g / scale) * scale).reshape(w.shape)


def _relative_error(weights, decoded) -> float:
    err = sum((w - d).pow(2).sum() for w, d in zip(weights, decoded))
    return (err / sum(w.pow(2).sum() for w in weights)).sqrt().item()


@pytest.mark.parametrize("experts_dtype", ["int8", "int4"])
def test_weight_error_no_worse_than_round_to_nearest(demo, experts_dtype):
    """Relative RMS error over all the demo's expert matrices: the codec's within 1% of plain
    round-to-nearest (int8 per row; int4 with a zero point, at the codec's own group size, which
    must be 32-128 as the issue asks). The 1% covers the codec's fp16 scales; on the demo, groups
    of 4096 (one per row) are 21% worse than groups of 64, and no zero point 8% worse."""
    stock, _, _ = demo
    weights = _expert_weights(stock)
    if experts_dtype == "int8":
        bits, group, zero_point = 8, None, False
    else:
        codec = make_codec(spec_of(find_moe_layers(stock)), "int4")
        group = next(f.group for f in codec.formats.values() if hasattr(f, "group"))
        assert 32 <= group <= 128, f"int4 group size {group}; the issue asks for 32-128"
        bits, zero_point = 4, True
    decoded = _expert_weights(compress_experts(copy.deepcopy(stock), experts_dtype))
    error = _relative_error(weights, decoded)
    reference = _relative_error(
        weights, [_round_to_nearest(w, bits, group or w.shape[-1], zero_point) for w in weights]
    )
    assert 0 < error <= 1.01 * reference, f"{experts_dtype}: relative error {error:.4f}, reference {reference:.4f}"


def test_int4_group_follows_the_module_setting(monkeypatch):
    """compression_quality.py measures other group sizes by setting `compression.INT4_GROUP`."""
    from moe_prefetch.experts import compression
    from moe_prefetch.experts.layout import ExpertSpec

    spec = ExpertSpec(names=("w",), shapes=((8, 256),), dtype=torch.float32)
    for group in (32, 128):
        monkeypatch.setattr(compression, "INT4_GROUP", group)
        codec = make_codec(spec, "int4")
        assert codec.formats["w"].group == group
        assert dict(zip(codec.stored.names, codec.stored.shapes))["w.sz"] == (8 * (256 // group) * 2 * 2,)  # fp16 pairs
