"""The host lane's MXFP4 / FP8 kernels on the stored bytes (`host_kernels.py`): bit for bit
decode-then-`F.linear` on one row, within rounding on many, chosen for half-precision models
only; int8 scales made once per expert and forgotten when its weights are replaced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from native_fixtures import fp8_checkpoint, mxfp4_checkpoint
from tiny_models import make_model, prompt

import moe_prefetch
from moe_prefetch.experts import cpu_kernels
from moe_prefetch.experts import host_kernels as kernels
from moe_prefetch.experts.compression import Codec, Int8
from moe_prefetch.experts.layout import ExpertSpec, find_moe_layers
from moe_prefetch.experts.native import MXFP4, FP8Block


def _codec(fmt, shape, dtype) -> Codec:
    return Codec(ExpertSpec(names=("w",), shapes=(shape,), dtype=dtype), fmt.name, {"w": fmt})


def _mxfp4(shape, seed=0):
    """An MXFP4 weight `[in, out]` with every code and the extreme exponents (0: the subnormal
    2 ** -127, 255: inf) in it."""
    torch.manual_seed(seed)
    parts = MXFP4().encode(torch.randn(shape) * 0.05)
    parts["blocks"].view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    parts["scales"][0, 0], parts["scales"][1, 0], parts["scales"][2, 0] = 0, 255, 1
    return parts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 96), (1024, 160)])  # one chunk; several chunks and a ragged last one
def test_mxfp4_kernel_is_decode_then_linear_bit_for_bit(dtype, shape):
    parts, fmt = _mxfp4(shape), MXFP4()
    proj = kernels.Projection(_codec(fmt, shape, dtype), "w", "mxfp4", transposed=True)
    decoded = torch.empty(shape, dtype=dtype)
    fmt.decode(parts, decoded)
    x = torch.randn(1, shape[0]).to(dtype)
    expected, got = F.linear(x, decoded.t().contiguous()), proj(x, parts)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    x = torch.randn(5, shape[0]).to(dtype)  # several rows: the same weights, any summation order
    torch.testing.assert_close(proj(x, parts), x @ decoded, atol=2e-2, rtol=2e-2, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "block"), [((64, 96), (32, 32)), ((1024, 256), (128, 128))])
def test_fp8_kernel_is_decode_then_linear_bit_for_bit(dtype, shape, block):
    torch.manual_seed(0)
    fmt = FP8Block(block)
    parts = fmt.encode(torch.randn(shape) * torch.logspace(-3, 1, shape[0]).unsqueeze(-1))
    parts["weight"].view(torch.uint8).view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # NaN codes too
    proj = kernels.Projection(_codec(fmt, shape, dtype), "w", "fp8", transposed=False)
    decoded = torch.empty(shape, dtype=dtype)
    fmt.decode(parts, decoded)
    x = torch.randn(1, shape[1]).to(dtype)
    expected, got = F.linear(x, decoded), proj(x, parts)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_the_kernels_are_chosen_for_half_precision_whole_blocks_only():
    def kind(fmt, shape, dtype, transposed):
        module = type("Experts", (), {"is_transposed": transposed})()
        return kernels.kind_of(_codec(fmt, shape, dtype), "w", module)

    assert kind(MXFP4(), (64, 96), torch.bfloat16, True) == "mxfp4"
    assert kind(MXFP4(), (64, 96), torch.float16, True) == "mxfp4"
    assert kind(MXFP4(), (64, 96), torch.float32, True) == "decode"  # fp32: decode + linear is exact
    assert kind(FP8Block((32, 32)), (64, 96), torch.bfloat16, False) == "fp8"
    assert kind(FP8Block((32, 32)), (64, 48), torch.bfloat16, False) == "decode"  # ragged edge blocks
    assert kind(FP8Block((32, 32)), (64, 96), torch.float32, False) == "decode"


@pytest.mark.parametrize(
    ("writer", "kind"),
    [(mxfp4_checkpoint, "mxfp4"), (lambda folder: fp8_checkpoint("qwen3_moe", folder, block=(32, 32)), "fp8")],
)
def test_a_bf16_native_checkpoint_on_the_host_lane_matches_it_resident(tmp_path, writer, kind):
    """The whole model: host lane (the new kernel) against every expert resident (the stock
    kernel on decoded weights), bf16, within bf16 rounding (the kernels themselves are checked
    bit for bit above; a random tiny model's logits have near ties, so no argmax check)."""
    writer(tmp_path)
    ids = prompt(batch=1, length=7)
    logits = {}
    for on_miss in ("host", "wait"):
        model, runtime = moe_prefetch.load(
            tmp_path, device="cpu", dtype=torch.bfloat16, cache_slots=64, on_miss=on_miss
        )
        try:
            with torch.no_grad():
                logits[on_miss] = model(ids).logits.float()
                decode = model(ids[:, :1]).logits.float()
            if on_miss == "host":
                assert runtime.stats()["host_kernel_calls"][kind] > 0
                host_decode = decode
            else:
                torch.testing.assert_close(host_decode, decode, atol=2e-2, rtol=2e-2)
        finally:
            runtime.detach()
    torch.testing.assert_close(logits["host"], logits["wait"], atol=2e-2, rtol=2e-2)


def test_int8_scales_are_made_once_per_expert(monkeypatch):
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")  # torch's int8 kernel, which takes the scales prepared
    shape = (48, 32)
    fmt = Int8()
    parts = fmt.encode(torch.randn(shape))
    proj = kernels.Projection(_codec(fmt, shape, torch.bfloat16), "w", "int8", transposed=False)
    prepared = proj.prepare(parts)
    assert prepared["kernel_scale"].dtype == torch.bfloat16 and "kernel_scale" not in parts
    x = torch.randn(1, shape[1]).to(torch.bfloat16)
    assert torch.equal(proj(x, prepared), proj(x, parts))
    prepared["kernel_scale"].zero_()  # the call reads the prepared scales, not the stored ones
    assert not proj(x, prepared).any()


@pytest.mark.parametrize("kernel", ["torch", "compiled"])
def test_int8_with_k_torchs_kernel_cannot_take_is_decoded_not_crashed(monkeypatch, kernel):
    """torch._weight_int8pack_mm kills the process (SIGSEGV) when K is not a multiple of 16: on
    torch's path such a parameter is decoded first, with the reason; the compiled kernel takes it."""
    if kernel == "torch":
        monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    elif not cpu_kernels.status().available:
        pytest.skip(f"no compiled kernel here: {cpu_kernels.status().reason}")
    shape = (7, 72)
    fmt = Int8()
    codec = _codec(fmt, shape, torch.bfloat16)
    kind = kernels.kind_of(codec, "w", object())
    assert kind == ("decode" if kernel == "torch" else "int8")
    if kind == "decode":
        assert "multiple of 16" in kernels.decode_reason(codec, "w", object())
    torch.manual_seed(0)
    parts = fmt.encode(torch.randn(shape))
    proj = kernels.Projection(codec, "w", kind, transposed=False)
    x = torch.randn(1, shape[1]).to(torch.bfloat16)
    weight = torch.empty(shape, dtype=torch.float32)
    fmt.decode(parts, weight)
    expected = F.linear(x.float(), weight)
    # bf16 output of a 72-term sum: the rounding is relative to the terms' size, not the result's
    scale = (x.float().abs() @ weight.abs().T).max().item()
    torch.testing.assert_close(proj(x, proj.prepare(parts)).float(), expected, rtol=0, atol=scale * 2**-7)


@pytest.mark.parametrize("kernel", ["torch", "compiled"])
def test_replaced_int8_experts_are_read_anew_by_the_host_lane(monkeypatch, kernel):
    """load_state_dict after the host lane prepared an expert's scales: the next forward uses
    the new scales (bit for bit a fresh attach of the new weights)."""
    model, other = make_model("mixtral", seed=0).to(torch.bfloat16), make_model("mixtral", seed=1).to(torch.bfloat16)
    fresh = make_model("mixtral", seed=1).to(torch.bfloat16)
    if kernel == "torch":  # the kernel that takes scales prepared in the model's dtype
        monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    elif not cpu_kernels.status().available:
        pytest.skip(f"no compiled kernel here: {cpu_kernels.status().reason}")
    ids = prompt(length=6)
    options = dict(device="cpu", cache_slots=4, experts_dtype="int8", on_miss="host")
    runtime = moe_prefetch.attach(model, **options)
    reference = moe_prefetch.attach(fresh, **options)
    try:
        with torch.no_grad():
            before = model(ids).logits
            assert runtime.host_lane._parts and all(
                ("kernel_scale" in parts["down_proj"]) == (kernel == "torch")
                for parts in runtime.host_lane._parts.values()
            )
            model.load_state_dict(other.state_dict())
            after, expected = model(ids).logits, fresh(ids).logits
        assert not torch.equal(before, after)
        assert torch.equal(after, expected)
    finally:
        runtime.detach()
        reference.detach()
    assert find_moe_layers(model)


def test_stats_say_why_demo_fine_int4_is_decoded():
    """demo-fine's experts (gate_up [96, 256], down [256, 48]) do not fit the int4 kernel's layout
    (rows in blocks of 64 with AVX-512, K in groups of 64): stored in k-pairs and decoded per use,
    which is why its int4 host lane ran at 0.04x llama.cpp; stats() says so."""
    from moe_prefetch.experts.compression import torch_int4_block

    model, runtime = moe_prefetch.load(
        "demo-fine", device="cpu", dtype=torch.bfloat16, experts_dtype="int4", cache_slots=16, on_miss="host"
    )
    try:
        said = runtime.stats()["host_kernels"]
    finally:
        runtime.detach()
    for name, shape in (("gate_up_proj", "[96, 256]"), ("down_proj", "[256, 48]")):
        assert said[name].startswith(f"{kernels.KERNEL_NAMES['decode']} (int4 {shape} stored in the k-pairs layout")
    if torch_int4_block():
        assert f"rows a multiple of {torch_int4_block()}, K of the group 64" in said["down_proj"]


def test_calibrate_times_every_stored_format():
    """`moe-prefetch calibrate` (and scripts/bench_host_kernels.py) time the lane's kernel of each
    stored format: each call computes the expert (close to the bf16 expert's output)."""
    from moe_prefetch.evidence.calibration import HOST_FORMATS, _host_expert, _swiglu, format_calls
    from moe_prefetch.experts.compression import torch_int4_block

    gen = torch.Generator().manual_seed(0)
    expert = _host_expert(256, 128, torch.bfloat16, gen)
    x = torch.randn(1, 256, generator=gen).to(torch.bfloat16)
    calls = format_calls(expert, x, copies=2)
    expected = {f for f in HOST_FORMATS if f != "int4" or torch_int4_block()}
    assert set(calls) == expected
    reference = _swiglu(x, *expert).float()
    for fmt, (nbytes, call) in calls.items():
        assert nbytes < sum(w.numel() * 2 for w in expert), fmt
        out = call().float()
        # the formats' own error on this SwiGLU (measured: int8 1.7%, fp8 5.1%, int4 16%, MXFP4 23%)
        bound = {"int8": 0.05, "fp8": 0.1, "int4": 0.25, "mxfp4": 0.35}[fmt]
        assert (out - reference).norm() < bound * reference.norm(), fmt
