"""Quantized checkpoints (`native.py`): GPT-OSS MXFP4 and block-scaled FP8 experts load in their
own format (the store holds the checkpoint's bytes, the link moves them), decode exactly as
transformers dequantizes them, and the offloaded model matches the all-resident reference."""

import copy
import json
import logging

import pytest
import torch
from native_fixtures import fp8_checkpoint, fp8_quant, mxfp4_checkpoint
from safetensors import safe_open
from test_exactness import _generate, assert_same_generation
from tiny_models import prompt
from transformers import AutoModelForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.quantizers.auto import AutoHfQuantizer

import moe_prefetch
from moe_prefetch.errors import CheckpointError
from moe_prefetch.experts import compression
from moe_prefetch.experts.compression import compress_experts
from moe_prefetch.experts.layout import find_moe_layers
from moe_prefetch.experts.native import MXFP4, FP8Block, _block_fp8_dequantize

# name -> (writer, experts_dtype the checkpoint loads as)
FIXTURES = {
    "gpt_oss-mxfp4": (lambda folder: mxfp4_checkpoint(folder), "mxfp4"),
    "deepseek_v3-fp8-32": (lambda folder: fp8_checkpoint("deepseek_v3", folder, block=(32, 32)), "fp8"),
    "qwen3_moe-fp8-32": (lambda folder: fp8_checkpoint("qwen3_moe", folder, block=(32, 32)), "fp8"),
    "qwen3_moe-fp8-128": (
        lambda folder: fp8_checkpoint(
            "qwen3_moe", folder, block=(128, 128), sizes=dict(hidden_size=128, moe_intermediate_size=128)
        ),
        "fp8",
    ),
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """name -> (folder, reference model), each written on first use."""
    root, made = tmp_path_factory.mktemp("native"), {}

    def get(name):
        if name not in made:
            folder = root / name
            made[name] = (folder, FIXTURES[name][0](folder))
        return made[name]

    return get


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_decode_is_transformers_dequantize(dtype):
    """Random blocks and exponents (every E2M1 code, exponents 2**-127..2**127): bit-exact."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 48, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 255, (3, 48, 4), generator=g, dtype=torch.uint8)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
    out = torch.empty(3, 128, 48, dtype=dtype)
    for e in range(3):
        MXFP4().decode({"blocks": blocks[e], "scales": scales[e]}, out[e])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shape, block", [((96, 64), (32, 32)), ((128, 256), (128, 128)), ((64, 96), (32, 16))])
def test_fp8_decode_is_transformers_dequantize(shape, block):
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)
    grid = (shape[0] // block[0], shape[1] // block[1])
    scale_inv = torch.rand(grid, generator=g) * 1e-2
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(shape, dtype=dtype)
        FP8Block(block).decode({"weight": weight, "scale_inv": scale_inv}, out)
        assert torch.equal(out, Fp8Dequantize(None)._dequantize_one(weight, scale_inv, output_dtype=dtype))


def test_encoders_decode_close_to_the_weights():
    """The fixtures' encoders: MXFP4 within half a step of the block's scale, FP8 within e4m3's
    relative precision; a ragged FP8 grid (96 rows in blocks of 64) covers every row."""
    w = torch.randn(64, 96)
    out = torch.empty_like(w)
    MXFP4().decode(MXFP4().encode(w), out)
    assert 0 < (out - w).abs().max() <= w.abs().max() / 6 * 2 * 0.5 + 1e-6
    fmt = FP8Block((64, 64))
    parts = fmt.encode(w)
    assert parts["scale_inv"].shape == (1, 2)
    fmt.decode(parts, out)
    assert 0 < (out - w).abs().max() <= w.abs().max() * 2**-3


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_reference_is_what_transformers_loads(fixtures, name):
    """The fixtures are in the layout transformers reads: its own `from_pretrained` of the quantized
    folder (dequantized on a CPU) gives exactly the reference's weights."""
    folder, reference = fixtures(name)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()
    expected = reference.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def _native_expert_bytes(folder, path: str, num_experts: int, model_itemsize: int) -> int:
    """One expert's bytes in the checkpoint's own format, from the checkpoint: its quantized
    tensors (uint8, fp8, their scales) as stored, other expert tensors (biases) in the model's dtype."""
    handle = safe_open(str(folder / "model.safetensors"), "pt")
    total = 0
    for key in handle.keys():
        if not key.startswith(f"{path}."):
            continue
        tensor = handle.get_tensor(key)
        expert = key.removeprefix(f"{path}.").split(".")[0]
        if expert.isdigit() and expert != "0":
            continue  # per-expert tensors: expert 0's stand for every expert's
        numel = tensor.numel() if expert.isdigit() else tensor.numel() // num_experts
        quantized = tensor.dtype in (torch.uint8, torch.float8_e4m3fn) or key.endswith("scale_inv")
        total += numel * (tensor.element_size() if quantized else model_itemsize)
    return total


@pytest.mark.parametrize("on_miss", ["wait", "auto"])
@pytest.mark.parametrize("name", FIXTURES)
def test_native_load_matches_reference(fixtures, name, on_miss):
    """Loaded with experts_dtype="auto" the experts stay in the checkpoint's format (the store rows
    are the checkpoint's bytes, the link moves them) and the offloaded model generates the
    reference's tokens, with eviction."""
    folder, reference = fixtures(name)
    top_k = max(layer.top_k for layer in find_moe_layers(reference))
    model, runtime = moe_prefetch.load(
        folder, device="cpu", dtype=torch.float32, cache_slots=top_k + 1, on_miss=on_miss
    )
    try:
        ids = prompt(batch=2, length=7)
        assert_same_generation(reference, model, ids)
        stats = runtime.stats()
        assert stats["experts_dtype"] == FIXTURES[name][1]
        assert stats["evictions"] > 0
        layer = find_moe_layers(model)[0]
        native = _native_expert_bytes(folder, layer.path, layer.num_experts, 4)
        parts = len(runtime.store.codec.stored.names)  # each aligned to 64 bytes in the store
        assert native <= stats["expert_bytes"] < native + 64 * parts
        assert stats["expert_bytes"] < 0.3 * runtime.store.spec.nbytes  # fp32 model: 4.25 or 8 bits of 32
        assert stats["bytes_loaded"] == stats["expert_bytes"] * stats["uploads"] > 0
        _assert_store_holds_checkpoint_bytes(runtime, folder, layer)
    finally:
        runtime.detach()


def _assert_store_holds_checkpoint_bytes(runtime, folder, layer):
    """Expert 1's first quantized part in the store is the checkpoint's tensor, byte for byte."""
    codec = runtime.store.codec
    handle = safe_open(str(folder / "model.safetensors"), "pt")
    row = runtime.store[(layer.layer_idx, 1)]
    views = codec.stored.views(row)
    pname = next(p for p, f in codec.formats.items() if isinstance(f, (MXFP4, FP8Block)))
    if isinstance(codec.formats[pname], MXFP4):
        raw = handle.get_tensor(f"{layer.path}.{pname}_blocks")[1]
        stored = views[f"{pname}.blocks"]
    else:  # down_proj: one source tensor per expert
        pname = "down_proj"
        raw = handle.get_tensor(f"{layer.path}.1.down_proj.weight")
        stored = views[f"{pname}.weight"]
    assert torch.equal(stored, raw.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("name", ["gpt_oss-mxfp4", "deepseek_v3-fp8-32"])
def test_other_experts_dtype_reencodes_the_dequantized_experts(fixtures, name):
    """experts_dtype="int4" on a quantized checkpoint: transformers' dequantized experts, encoded
    as int4; the reference is the reference model with int4 experts."""
    folder, reference = fixtures(name)
    reference = compress_experts(copy.deepcopy(reference), "int4")
    model, runtime = moe_prefetch.load(
        folder, device="cpu", dtype=torch.float32, cache_slots=3, experts_dtype="int4", on_miss="wait"
    )
    try:
        ids = prompt(batch=1, length=7)
        assert_same_generation(reference, model, ids)
        assert runtime.stats()["experts_dtype"] == "int4"
    finally:
        runtime.detach()


def test_a_block_grid_that_does_not_decode_is_stored_dequantized(tmp_path, caplog):
    """Block 128 over 64-row gate and up projections: concatenated, their scale grids are 2 x 1
    where a 128-row block grid of the fused 128 rows is 1 x 1, so gate_up_proj cannot stay FP8;
    it is stored as transformers dequantizes it, with a warning, and the model still matches."""
    reference = fp8_checkpoint("qwen3_moe", tmp_path / "fp8", block=(128, 128))
    with caplog.at_level(logging.WARNING, logger="moe_prefetch.experts.native"):
        model, runtime = moe_prefetch.load(tmp_path / "fp8", device="cpu", dtype=torch.float32, cache_slots=4)
    try:
        assert "gate_up_proj: the checkpoint's fp8 layout does not decode" in caplog.text
        assert isinstance(runtime.store.codec.formats["down_proj"], FP8Block)
        assert not isinstance(runtime.store.codec.formats["gate_up_proj"], FP8Block)
        ids = prompt(batch=1, length=7)
        assert torch.equal(_generate(model, ids)[0], _generate(reference, ids)[0])
    finally:
        runtime.detach()


def test_unsupported_quant_method_is_a_clear_error(checkpoints, tmp_path):
    folder, _ = checkpoints["mixtral"]
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    for file in folder.iterdir():
        (gptq / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (gptq / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantization method 'gptq' .* not supported; supported: mxfp4 .*fp8"):
        moe_prefetch.load(gptq, device="cpu", dtype=torch.float32, cache_slots=4)


def test_decode_in_chunks_gives_the_same_values(monkeypatch):
    """Chunked decoding (bounded temporaries for big experts) writes the same values."""
    w = torch.randn(64, 96)
    for fmt in (MXFP4(), FP8Block((32, 32)), FP8Block((16, 64))):
        parts = fmt.encode(w)
        whole, chunked = torch.empty_like(w), torch.empty_like(w)
        fmt.decode(parts, whole)
        monkeypatch.setattr(compression, "_DECODE_ELEMS", 100)
        fmt.decode(parts, chunked)
        monkeypatch.undo()
        assert torch.equal(whole, chunked)


def test_ragged_fp8_blocks_use_the_block_size():
    """A weight whose rows are not a multiple of the block (DeepSeek-V3's kv_a_proj_with_mqa: 576
    rows, 5 blocks of 128; here 36 rows, 5 blocks of 8): transformers' op refuses it, ours
    decodes it in the checkpoint's blocks, with a partial last one."""
    quantizer = AutoHfQuantizer.from_config({**fp8_quant((8, 8)), "dequantize": True}, pre_quantized=True)
    weight = torch.randn(36, 16).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(5, 2)
    with pytest.raises(ValueError, match="not divisible"):
        Fp8Dequantize(quantizer)._dequantize_one(weight, scale_inv, output_dtype=torch.float32)
    expected = torch.empty(36, 16)
    FP8Block((8, 8)).decode({"weight": weight, "scale_inv": scale_inv}, expected)
    op = _block_fp8_dequantize()(quantizer)
    assert torch.equal(op._dequantize_one(weight, scale_inv, output_dtype=torch.float32), expected)
    last_block = weight[32:].float() * scale_inv[4].repeat_interleave(8)  # rows 32..35 under scale row 4
    assert expected[32:].abs().sum() > 0 and torch.equal(expected[32:], last_block)


def test_ragged_fp8_checkpoint_loads_in_its_blocks(tmp_path):
    """DeepSeek-V3 with blocks of 16: its 24-row attention projections have a partial second
    block, which transformers' own load reads as two blocks of 12; `load` reads the checkpoint's
    blocks and matches the reference."""
    reference = fp8_checkpoint("deepseek_v3", tmp_path / "fp8", block=(16, 16))
    name = "model.layers.0.self_attn.q_a_proj.weight"
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp8"), dtype=torch.float32).state_dict()
    assert not torch.equal(stock[name], reference.state_dict()[name])
    model, runtime = moe_prefetch.load(tmp_path / "fp8", device="cpu", dtype=torch.float32, cache_slots=3)
    try:
        assert torch.equal(model.state_dict()[name], reference.state_dict()[name])
        ids = prompt(batch=2, length=7)
        assert_same_generation(reference, model, ids)
        assert runtime.stats()["experts_dtype"] == "fp8"
    finally:
        runtime.detach()


@pytest.mark.parametrize("predictor", ["next-gate", "oracle"])
@pytest.mark.parametrize("name", ["gpt_oss-mxfp4", "deepseek_v3-fp8-32"])
def test_native_with_predictors(fixtures, name, predictor):
    """Prefetched native experts: every slot checked against its store row after each copy
    (verify_slots), tokens equal to the reference's."""
    folder, reference = fixtures(name)
    model, runtime = moe_prefetch.load(
        folder,
        device="cpu",
        dtype=torch.float32,
        cache_slots=3,
        predictor=predictor,
        lookahead=2,
        verify_slots=True,
        on_miss="wait",
    )
    try:
        ids = prompt(batch=1, length=7)
        assert_same_generation(reference, model, ids)
        assert runtime.stats()["evictions"] > 0
    finally:
        runtime.detach()


@pytest.mark.parametrize("kind", ["mxfp4", "fp8"])
def test_sizing_counts_the_native_bytes(tmp_path, kind):
    """`inspect` and profile sizing (the anatomy) see the experts as `load` stores them: packed,
    not at the model dtype's size, so slots and fits are counted right for quantized checkpoints."""
    from moe_prefetch.evidence.anatomy import of_config
    from moe_prefetch.model.folders import read_config

    if kind == "mxfp4":
        mxfp4_checkpoint(tmp_path)
    else:
        fp8_checkpoint("qwen3_moe", tmp_path)
    size = of_config(read_config(tmp_path), str(tmp_path), torch.bfloat16)
    assert size.expert_bytes("auto") < 0.6 * size.expert_bytes("bf16")
    model, runtime = moe_prefetch.load(tmp_path, device="cpu", cache_slots=3, dtype=torch.bfloat16)
    try:
        assert runtime.stats()["expert_bytes"] == size.expert_bytes("auto")
    finally:
        runtime.detach()


def test_quantize_a_native_checkpoint_ahead_of_time(tmp_path, monkeypatch):
    """`moe-prefetch quantize` opens a quantized checkpoint as `load` does (its quantizer in
    dequantize mode): an MXFP4 checkpoint quantizes to int4, and load then reads that copy."""
    from moe_prefetch.model import quantized_copy

    mxfp4_checkpoint(tmp_path)
    info = quantized_copy.quantize(tmp_path, "int4", device="cpu")
    assert not info.reused and info.copy_bytes > 0
    calls = []
    encode = compression.Codec.encode
    monkeypatch.setattr(compression.Codec, "encode", lambda self, t: calls.append(1) or encode(self, t))
    model, runtime = moe_prefetch.load(tmp_path, device="cpu", cache_slots=3, experts_dtype="int4")
    try:
        assert calls == [] and runtime.stats()["experts_dtype"] == "int4"
        ids = prompt(batch=1, length=5)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    finally:
        runtime.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_batched_mxfp4_decode_gives_the_host_values(monkeypatch, dtype):
    """The device's wave decode (bf16 lookup in a bf16 model, the power of two from its bits),
    forced on the CPU: the host decode's values bit for bit, for every code and every exponent
    byte, 0 (2**-127) and 255 (inf) included."""
    from test_compression import _stored_rows, assert_batched_decode_is_the_host_decode

    from moe_prefetch.experts.compression import make_codec
    from moe_prefetch.experts.layout import ExpertSpec

    spec = ExpertSpec(names=("gate_up_proj", "bias"), shapes=((64, 96), (96,)), dtype=dtype)
    codec = make_codec(spec, "auto", native={"gate_up_proj": MXFP4()})
    rows = _stored_rows(codec, 3, raw=("gate_up_proj.blocks", "gate_up_proj.scales"))
    scales = codec.typed(rows)["gate_up_proj"]["scales"]
    scales[0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    scales[1, 0, :2] = torch.tensor([1, 254], dtype=torch.uint8)
    assert_batched_decode_is_the_host_decode(monkeypatch, codec, rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, block", [((96, 64), (32, 32)), ((64, 96), (32, 16)), ((40, 64), (32, 32))])
def test_batched_fp8_decode_gives_the_host_values(monkeypatch, dtype, shape, block):
    """FP8 weights cast to the model's dtype (exact) times their block's fp32 scale, a wave at
    once; a ragged grid (40 rows in blocks of 32) goes one expert at a time."""
    from test_compression import _stored_rows, assert_batched_decode_is_the_host_decode

    from moe_prefetch.experts.compression import make_codec
    from moe_prefetch.experts.layout import ExpertSpec

    spec = ExpertSpec(names=("w",), shapes=(shape,), dtype=dtype)
    codec = make_codec(spec, "auto", native={"w": FP8Block(block)})
    rows = _stored_rows(codec, 3, raw=("w.weight",))  # every e4m3 code, NaN included
    assert_batched_decode_is_the_host_decode(monkeypatch, codec, rows, scratch_bytes=32 * 96 * 4 * 3 + 4096)
