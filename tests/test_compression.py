"""Compressed experts (`experts_dtype`): the formats round-trip within their precision, the store
and the link carry the compressed bytes, and an offloaded compressed model computes exactly what
the same model with the same compressed experts all resident computes."""

import copy

import pytest
import torch
from test_exactness import assert_same_generation
from tiny_models import interface_model_types, make_model, prompt

import moe_prefetch
from moe_prefetch.errors import ConfigError
from moe_prefetch.experts import compression, cpu_kernels
from moe_prefetch.experts import host_kernels as kernels
from moe_prefetch.experts.compression import Int4, compress_experts, make_codec, round_trip
from moe_prefetch.experts.layout import SUPPORTED, ExpertSpec, find_moe_layers, spec_of

SPEC = ExpertSpec(names=("gate_up_proj", "down_proj", "bias"), shapes=((96, 80), (80, 48), (96,)), dtype=torch.float32)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in zip(SPEC.names, SPEC.shapes)}


@pytest.mark.parametrize(
    "dtype, max_rel, max_ratio",
    [("bf16", 2**-8, 0.51), ("int8", 1 / 127, 0.28), ("int4", 1 / 15, 0.30)],
)
def test_round_trip_error_and_size(dtype, max_rel, max_ratio):
    """Each weight decodes within half a quantisation step (relative to its row's or group's range),
    and the stored expert is the expected fraction of the fp32 one. Biases stay exact."""
    tensors = _tensors()
    codec = make_codec(SPEC, dtype)
    decoded = round_trip(codec, tensors)
    for name in ("gate_up_proj", "down_proj"):
        w = tensors[name]
        err = (decoded[name] - w).abs().max().item()
        assert 0 < err <= max_rel * w.abs().max().item() * 2
    assert torch.equal(decoded["bias"], tensors["bias"])
    assert codec.nbytes <= max_ratio * SPEC.nbytes


def test_auto_keeps_the_model_dtype():
    codec = make_codec(SPEC, "auto")
    assert codec.identity and codec.stored is SPEC and codec.name == "float32"
    assert round_trip(codec, _tensors())["down_proj"].equal(_tensors()["down_proj"])


def test_int4_levels_are_exact_for_quantised_values():
    """A weight matrix that already sits on 16 levels per group decodes to itself (up to fp16
    rounding of scale and minimum): the packing order and nibble layout are right."""
    codec = make_codec(SPEC, "int4")
    levels = torch.randint(0, 16, (96, 80)).float() * 0.25 - 1.0
    levels[:, ::64] = -1.0  # every group spans the full 0..15 range
    levels[:, 1::64] = 2.75
    tensors = {**_tensors(), "gate_up_proj": levels}
    assert torch.equal(round_trip(codec, tensors)["gate_up_proj"], levels)


def test_decode_in_chunks_gives_the_same_values(monkeypatch):
    blocks = ExpertSpec(names=("w",), shapes=((256, 128),), dtype=torch.bfloat16)  # int4 in blocks of rows
    for spec, dtype in ((SPEC, "int8"), (SPEC, "int4"), (blocks, "int4")):
        g = torch.Generator().manual_seed(0)
        tensors = {name: torch.randn(shape, generator=g) for name, shape in zip(spec.names, spec.shapes)}
        codec = make_codec(spec, dtype)
        whole = round_trip(codec, tensors)
        monkeypatch.setattr(compression, "_DECODE_ELEMS", 100)
        chunked = round_trip(codec, tensors)
        monkeypatch.undo()
        for name in whole:
            assert torch.equal(whole[name], chunked[name])


def test_unknown_experts_dtype_is_a_clear_error():
    with pytest.raises(ConfigError, match="experts_dtype='int3' is not one of"):
        moe_prefetch.load("demo", device="cpu", cache_slots=12, experts_dtype="int3")


def _offloaded_matches_reference(stock, experts_dtype, batch=2, **options):
    """`stock` offloaded with compressed experts against the same model with the same compressed
    experts all resident: equal greedy tokens, logits within float tolerance, with eviction."""
    reference = compress_experts(copy.deepcopy(stock), experts_dtype)
    model = copy.deepcopy(stock)
    top_k = max(layer.top_k for layer in find_moe_layers(model))
    options.setdefault("cache_slots", top_k + 1)
    runtime = moe_prefetch.attach(model, device="cpu", experts_dtype=experts_dtype, **options)
    try:
        ids = prompt(batch=batch, length=7)
        assert_same_generation(reference, model, ids)
        stats = runtime.stats()
        assert stats["experts_dtype"] == experts_dtype
        assert stats["evictions"] > 0
        assert stats["bytes_loaded"] == stats["expert_bytes"] * stats["uploads"]
        assert stats["expert_bytes"] < spec_of(find_moe_layers(stock)).nbytes
        return runtime, reference
    finally:
        runtime.detach()


@pytest.mark.parametrize("on_miss", ["wait", "auto"])
@pytest.mark.parametrize("arch", [a for a in interface_model_types() if a in SUPPORTED])
def test_int4_offloaded_matches_int4_resident(arch, on_miss):
    _offloaded_matches_reference(make_model(arch), "int4", on_miss=on_miss)


@pytest.mark.parametrize("arch", [a for a in interface_model_types() if a in SUPPORTED])
def test_int8_offloaded_matches_int8_resident(arch):
    _offloaded_matches_reference(make_model(arch), "int8", on_miss="auto")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_bf16_experts_match_their_reference(arch):
    _offloaded_matches_reference(make_model(arch), "bf16", on_miss="auto")


def test_m2r2_with_int4_on_the_demo_matches_the_int4_reference():
    """The trained demo with its adapters: m2r2 predictions (router and adapters in full
    precision) over int4 experts, against the demo with the same int4 experts all resident."""
    from transformers import AutoModelForCausalLM

    from moe_prefetch.model.folders import resolve_path

    stock = AutoModelForCausalLM.from_pretrained(resolve_path("demo"), dtype=torch.float32)
    reference = compress_experts(stock, "int4")
    model, runtime = moe_prefetch.load(
        "demo", device="cpu", cache_slots=12, experts_dtype="int4", predictor="m2r2", lookahead=2, verify_slots=True
    )
    try:
        ids = prompt(batch=1, length=8)
        assert_same_generation(reference, model, ids)
        stats = runtime.stats()
        assert stats["predictor"] == "m2r2" and stats["prefetch_issued"] > 0 and stats["evictions"] > 0
    finally:
        runtime.detach()


@pytest.mark.parametrize("predictor", ["previous-token", "next-gate", "oracle"])
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_predictors_with_int4(arch, predictor):
    _offloaded_matches_reference(
        make_model(arch), "int4", cache_slots=3, predictor=predictor, lookahead=2, verify_slots=True, on_miss="wait"
    )


def test_detach_gives_back_the_decoded_experts():
    """Compressing is lossy by request: after detach the model holds what it computed with."""
    stock = make_model("mixtral")
    reference = compress_experts(copy.deepcopy(stock), "int4")
    runtime = moe_prefetch.attach(stock, device="cpu", cache_slots=3, experts_dtype="int4")
    state = {k: v.clone() for k, v in stock.state_dict().items()}
    runtime.detach()
    for name, value in reference.state_dict().items():
        assert torch.equal(stock.state_dict()[name], value), name
        assert torch.equal(state[name], value), name  # state_dict while attached, too


def test_demo_int4_moves_at_most_a_third_of_bf16_bytes():
    """The issue's bar: per decoded token, int4 loads at most 0.35x the bytes bf16 loads."""
    ids = prompt(batch=1, length=8)
    per_token = {}
    for dtype in ("bf16", "int4"):
        model, runtime = moe_prefetch.load("demo", device="cpu", cache_slots=12, experts_dtype=dtype)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        per_token[dtype] = runtime.stats()["bytes_loaded"] / 16
        runtime.detach()
    assert 0 < per_token["int4"] <= 0.35 * per_token["bf16"]


def test_placement_charges_the_host_lane_for_decoding():
    """A compressed expert moves fewer bytes over the link, but the host lane reads it, writes
    the decoded copy and reads that again: the placement's host time must count all three."""
    from moe_prefetch.runtime.placement import DEFAULT_COSTS, Placement

    plain, packed = make_codec(SPEC, "auto"), make_codec(SPEC, "int4")
    assert packed.host_bytes > packed.nbytes + 2 * SPEC.nbytes  # plus the decode's temporaries
    slow_host = DEFAULT_COSTS.__class__(**{**DEFAULT_COSTS.__dict__, "host_call_s": 0.0})
    p_plain = Placement(slow_host, plain.nbytes, SPEC.numel, "auto", plain.host_bytes)
    p_packed = Placement(slow_host, packed.nbytes, SPEC.numel, "auto", packed.host_bytes)
    assert p_packed.link_s() < p_plain.link_s()
    assert p_packed.host_s(1) > p_plain.host_s(1)


@pytest.mark.parametrize("kernel", ["compiled", "torch"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "olmoe"])
def test_host_lane_reads_int8_as_stored_in_half_precision(arch, kernel, monkeypatch):
    """bf16 with int8 experts: the host lane runs an int8 kernel on the stored bytes (no decode)
    with the model's own gating, within bf16 rounding of the reference: the compiled one
    (experts/cpu_kernels.c, where it builds) and torch's packed kernel (its fallback).

    Logits of a tiny random model hide an expert output that is 10% off (the experts add little
    to the residual), so each MoE layer's expert output is also compared on its own inputs with
    the same experts decoded to fp32: the host lane may be off by a few times what the bf16
    reference's own rounding costs on those inputs (measured: at most 1.7x; a 10% error: 13x+)."""
    if kernel == "torch":
        monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    stock = make_model(arch).to(torch.bfloat16)
    reference = compress_experts(copy.deepcopy(stock), "int8")
    model = copy.deepcopy(stock)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=3, experts_dtype="int8", on_miss="host")
    if kernel == "torch":
        assert all(k.startswith("torch._weight_int8pack_mm") for k in runtime.stats()["host_kernels"].values())
    calls = []  # (layer_idx, the experts' inputs, their output) as the host lane computed it
    hooks = [
        layer.experts.register_forward_hook(lambda m, args, out, i=layer.layer_idx: calls.append((i, args, out)))
        for layer in find_moe_layers(model)
    ]
    try:
        ids = prompt(batch=2, length=7)
        with torch.no_grad():
            expected, got = reference(ids).logits.float(), model(ids).logits.float()
        torch.testing.assert_close(got, expected, atol=4e-3, rtol=1e-2)
        assert runtime.stats()["host_kernel_calls"]["int8"] > 0
        # nothing decoded on the host: the stored bytes at the packed kernel's cost per byte
        assert runtime.placement.host_bytes == kernels.host_bytes(runtime.codec, runtime.layers[0].experts)
        assert runtime.codec.nbytes <= runtime.placement.host_bytes < runtime.codec.host_bytes
    finally:
        for hook in hooks:
            hook.remove()
        runtime.detach()
    experts = {layer.layer_idx: layer.experts for layer in find_moe_layers(reference)}
    assert sorted({i for i, _, _ in calls}) == sorted(experts)
    for layer_idx, args, out in calls:
        fp32 = copy.deepcopy(experts[layer_idx]).float()
        with torch.no_grad():
            exact = fp32(*(a.float() if a.is_floating_point() else a for a in args))
            rounding = (experts[layer_idx](*args).float() - exact).abs().max().item()
        error = (out.float() - exact).abs().max().item()
        assert 0 < rounding and error <= 4 * rounding, f"layer {layer_idx}: {error:.2e} vs bf16 rounding {rounding:.2e}"


def test_fp32_host_lane_stays_exact():
    """fp32 keeps decode + the stock kernel on the host lane: exact, and the packed kernel gains little."""
    stock = make_model("mixtral")
    runtime = moe_prefetch.attach(copy.deepcopy(stock), device="cpu", cache_slots=3, experts_dtype="int8")
    try:
        assert set(runtime.host_lane.kinds[0].values()) == {"decode"}
        assert runtime.placement.host_bytes == runtime.codec.host_bytes
    finally:
        runtime.detach()


def test_bench_simulates_each_experts_dtype_at_its_sizes(tmp_path):
    """`bench --experts-dtype bf16,int4` on a shape: rows per dtype, the int4 rows move int4's
    bytes (0.28x), get more slots in the same card's memory, and simulate faster on a link-bound card."""
    import json

    from typer.testing import CliRunner

    from moe_prefetch.cli.main import app

    out = tmp_path / "dtypes.json"
    args = [
        "bench",
        *("--model", "shape:mixtral-8x7b", "--routing", "demo", "--on-miss", "wait", "--predictors", "none"),
        *("--profiles", "rtx3060-12gb", "--tokens", "8", "--warmup", "4"),
        *("--experts-dtype", "bf16,int4", "--json", str(out)),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {r["experts_dtype"]: r for r in json.loads(out.read_text())["rows"] if r["predictor"] == "none"}
    assert set(rows) == {"bf16", "int4"}
    assert rows["int4"]["expert_bytes"] < 0.3 * rows["bf16"]["expert_bytes"]
    slots = {d: r["cache_slots"]["rtx3060-12gb"] for d, r in rows.items()}
    assert slots == {"bf16": 18, "int4": 61} and all(r["fits"]["rtx3060-12gb"] for r in rows.values())
    assert rows["int4"]["simulated"]["rtx3060-12gb"] > rows["bf16"]["simulated"]["rtx3060-12gb"]


def test_measured_bench_with_int4_leaves_the_model_as_it_was():
    """Each run attaches and detaches; detach hands back decoded experts, so the bench restores
    the originals: every run starts from the same weights and the caller's model is unchanged."""
    from moe_prefetch.evidence.bench import run_bench

    model = make_model("mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run_bench(model, prompt(1, 6), ["none", "next-gate"], [0.5], tokens=4, device="cpu", experts_dtype="int4")
    rows = [r for r in result["rows"] if r["tokens_per_s"] is not None]  # the measured rows, not the bounds
    assert {r["experts_dtype"] for r in rows} == {"int4"} and all(r["same_tokens"] for r in rows)
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_single_pass_decode_gives_the_scratch_path_values(monkeypatch, dtype, out_dtype):
    """The device decodes in one mixed-dtype op per format; forced on the CPU it must give the
    host's scratch-path values bit for bit (the all-resident reference is built with the latter)."""
    spec = ExpertSpec(names=("w",), shapes=((96, 128),), dtype=out_dtype)
    codec = make_codec(spec, dtype)
    row = torch.empty(codec.stored.numel, dtype=torch.uint8)
    encoded = codec.encode({"w": torch.randn(96, 128)})
    for name, view in codec.stored.views(row).items():
        view.copy_(encoded[name])
    host = codec.expand(row)["w"].clone()
    monkeypatch.setattr(compression, "_single_pass", lambda device: True)
    single = codec.expand(row)["w"]
    assert torch.equal(single, host)


def _stored_rows(codec, n, seed=0, raw=()):
    """`n` experts as stored rows `[n, stored.numel]`: encoded from random weights, except the
    parts named in `raw` (e.g. "w.blocks"), filled with random bytes (every code and exponent)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, codec.stored.numel, dtype=torch.uint8)
    for e in range(n):
        weights = {name: torch.randn(shape, generator=g) for name, shape in zip(codec.spec.names, codec.spec.shapes)}
        encoded = codec.encode(weights)
        for name, view in codec.stored.views(rows[e]).items():
            noise = torch.randint(0, 256, view.shape, generator=g, dtype=torch.uint8)
            view.copy_(noise if name in raw else encoded[name])
    return rows


def assert_batched_decode_is_the_host_decode(monkeypatch, codec, rows, scratch_bytes=None):
    """The device path (a wave at once, `decode_batch`), forced on the CPU, writes the host
    path's values (one expert at a time) into a strided working buffer, also when its scratch
    is small enough to split the wave into row chunks."""
    n = rows.shape[0]
    host = torch.full((n, codec.spec.numel), 7.0, dtype=codec.spec.dtype)
    codec.decode(rows, host)
    monkeypatch.setattr(compression, "_single_pass", lambda device: True)
    small = compression.Scratch(torch.empty(scratch_bytes or 1 << 13, dtype=torch.uint8))
    for scratch in (None, small):
        work = torch.full((n + 1, codec.spec.numel), 7.0, dtype=codec.spec.dtype)  # one row more: strides as in a pool
        codec.decode(rows, work[:n], scratch)
        torch.testing.assert_close(work[:n], host, rtol=0, atol=0, equal_nan=True)
        assert bool((work[n] == 7.0).all()), "wrote outside the wave"
    assert small.overflows == 0
    monkeypatch.undo()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("cols", [128, 80])  # 80: int4 groups padded to 128
def test_batched_device_decode_gives_the_host_values(monkeypatch, dtype, out_dtype, cols):
    spec = ExpertSpec(names=("w1", "w2", "b"), shapes=((96, cols), (cols, 64), (96,)), dtype=out_dtype)
    codec = make_codec(spec, dtype)
    # int4 in the kernel's block layout (bf16, rows a multiple of the block) decodes whole blocks
    blocks = any(getattr(f, "block", 0) for f in codec.formats.values())
    scratch = 1 << 17 if blocks else None
    assert_batched_decode_is_the_host_decode(monkeypatch, codec, _stored_rows(codec, 3), scratch_bytes=scratch)


def _int4_block_codec(block: int = 64) -> compression.Codec:
    """int4 in the layout torch's CPU int4 kernel reads (blocks of 64 rows, as with AVX-512),
    whatever this CPU's torch packs."""
    spec = ExpertSpec(names=("w1", "w2"), shapes=((128, 128), (128, 64)), dtype=torch.bfloat16)
    return compression.Codec(spec, "int4", {n: Int4(block=block, sz_dtype=torch.bfloat16) for n in spec.names})


@pytest.mark.parametrize("block", [64, 32])
def test_batched_device_decode_reads_the_kernel_layout(monkeypatch, block):
    """The int4 block layout (issue 19) decoded a wave at once on the device path (issue 20,
    item 7): the host decode's values, in whole-block row chunks when the scratch is small."""
    codec = _int4_block_codec(block)
    assert_batched_decode_is_the_host_decode(monkeypatch, codec, _stored_rows(codec, 3), scratch_bytes=1 << 15)


def test_device_decode_launches_do_not_grow_with_the_wave(monkeypatch):
    """Issue 20: the device decoded one expert and one part at a time (about 4,000 launches per
    token for Qwen3-30B-A3B in int4); a wave is now a few ops per parameter whatever its size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            returns = func._schema.returns  # views and slices launch nothing: not counted
            if not returns or any(r.alias_info is None or r.alias_info.is_write for r in returns):
                Count.ops += 1
            return func(*args, **(kwargs or {}))

    spec = ExpertSpec(names=("w1", "w2"), shapes=((96, 128), (128, 64)), dtype=torch.bfloat16)
    monkeypatch.setattr(compression, "_single_pass", lambda device: True)
    for dtype in ("int8", "int4", "int4-block"):
        codec = _int4_block_codec() if dtype == "int4-block" else make_codec(spec, dtype)
        counts = []
        for n in (1, 8):
            rows = _stored_rows(codec, n)
            work = torch.empty(n, codec.spec.numel, dtype=codec.spec.dtype)
            scratch = compression.Scratch(torch.empty(1 << 20, dtype=torch.uint8))
            Count.ops = 0
            with Count():
                codec.decode(rows, work, scratch)
            counts.append(Count.ops)
        assert counts[0] == counts[1], f"{dtype}: {counts[0]} ops for one expert, {counts[1]} for eight"
        assert counts[1] <= 6 * len(spec.names), counts  # int4: two unpacks, two casts, one addcmul per parameter


def test_decode_scratch_is_sized_for_a_wave_and_capped():
    spec = ExpertSpec(names=("w1", "w2"), shapes=((96, 128), (128, 64)), dtype=torch.bfloat16)
    assert compression.scratch_bytes(make_codec(spec, "bf16"), 8) == 0  # plain experts decode nothing
    int4 = compression.scratch_bytes(make_codec(spec, "int4"), 8)
    # 8 experts x 96 x 128 values x (1 byte of nibbles + 8 bytes per group of 64) x 1.25, + alignment
    assert int4 == int(8 * 96 * 128 * (1 + 8 / 64) * 1.25) + 16 * 256
    big = ExpertSpec(names=("w",), shapes=((14336, 4096),), dtype=torch.bfloat16)  # a Mixtral matrix
    assert compression.scratch_bytes(make_codec(big, "int4"), 2) == compression.DECODE_SCRATCH_BYTES


@pytest.mark.skipif(not compression.torch_int4_block(), reason="torch's CPU int4 kernel packs differently here")
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_host_lane_reads_int4_as_stored_in_bf16(arch):
    """bf16 with int4 experts whose shapes the kernel takes (rows a multiple of its block, K of
    the group): the store holds torch's CPU int4 layout, the host lane runs
    `torch._weight_int4pack_mm_for_cpu` on those bytes with the model's own gating, within bf16
    rounding of the reference (the same int4 experts decoded, all resident)."""
    from tiny_models import sized_config

    sizes = {"hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 64}
    stock = make_model(arch, config=sized_config(arch, **sizes)).to(torch.bfloat16)
    reference = compress_experts(copy.deepcopy(stock), "int4")
    model = copy.deepcopy(stock)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=3, experts_dtype="int4", on_miss="host")
    try:
        assert {f.layout for f in runtime.codec.formats.values()} == {f"block{compression.torch_int4_block()}"}
        ids = prompt(batch=2, length=7)
        with torch.no_grad():
            expected, got = reference(ids).logits.float(), model(ids).logits.float()
        torch.testing.assert_close(got, expected, atol=4e-3, rtol=1e-2)
        stats = runtime.stats()
        assert stats["host_kernel_calls"]["int4"] > 0 and stats["host_kernel_calls"]["decode"] == 0
        # nothing decoded on the host: the stored bytes at the packed kernel's cost per byte
        assert runtime.placement.host_bytes == kernels.host_bytes(runtime.codec, runtime.layers[0].experts)
        assert runtime.codec.nbytes <= runtime.placement.host_bytes < runtime.codec.host_bytes
    finally:
        runtime.detach()


@pytest.mark.skipif(not compression.torch_int4_block(), reason="torch's CPU int4 kernel packs differently here")
def test_int4_decode_reads_the_kernels_bytes_as_the_kernel_does():
    """One set of bytes for both lanes: the device's decode of the stored int4 layout gives, bit
    for bit, the weights torch's CPU int4 kernel computes with (read off by multiplying by I)."""
    spec = ExpertSpec(names=("w",), shapes=((192, 128),), dtype=torch.bfloat16)
    codec = make_codec(spec, "int4")
    assert codec.formats["w"].kernel_layout((192, 128))
    row = torch.empty(codec.stored.numel, dtype=torch.uint8)
    encoded = codec.encode({"w": torch.randn(192, 128)})
    for name, view in codec.stored.views(row).items():
        view.copy_(encoded[name])
    parts = codec.typed(row)["w"]
    eye = torch.eye(128, dtype=torch.bfloat16)
    seen = torch._weight_int4pack_mm_for_cpu(eye, parts["q"], codec.formats["w"].group, parts["sz"]).t()
    assert torch.equal(seen, codec.expand(row)["w"])
