"""Offloading never changes what the model computes: every architecture transformers builds
with its experts interface, every predictor, every on-miss placement (wait for the upload,
the host lane, auto), caches much smaller than the experts (so eviction happens), prefill and
decode, batch 1 and 2."""

import pytest
import torch
import transformers
from tiny_models import interface_model_types, pinned_version, prompt

import moe_prefetch
from moe_prefetch.experts.layout import SUPPORTED, find_moe_layers

ATOL = 1e-4

# auto places misses as where the host lane runs beside the device (conftest.py)
pytestmark = pytest.mark.usefixtures("host_lane_beside_the_device")


def _generate(model, ids, n=5):
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits)


def assert_same_generation(reference, model, ids, n=5):
    """`model` generates `reference`'s greedy tokens, with logits within ATOL at every step."""
    seq_ref, logits_ref = _generate(reference, ids, n)
    seq, logits = _generate(model, ids, n)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=ATOL, rtol=0)


def _check(stock, model, runtime, batch, on_miss="wait"):
    ids = prompt(batch=batch, length=7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=ATOL, rtol=0)
    assert_same_generation(stock, model, ids)
    stats = runtime.stats()
    assert stats["on_miss"] == on_miss
    if on_miss == "host":  # on a CPU device nothing is copied then (no copy could pay)
        assert stats["uploads"] == stats["evictions"] == 0
    else:
        assert stats["evictions"] > 0, "the cache was large enough that nothing was evicted"
    assert stats["bytes_loaded"] == stats["expert_bytes"] * stats["uploads"]
    if on_miss == "wait":
        assert stats["misses"] > 0 and stats["host_experts"] == 0
    else:  # on a CPU device the host lane is the cheaper one for a few tokens: auto uses it
        assert stats["host_experts"] > 0 and (on_miss == "auto" or stats["misses"] == 0)
        assert any(record["host"] for record in runtime.trace)


# Model types in the causal-LM mapping that are not tested here, and why.
_COMPOSITE = "multimodal config (text + vision/audio towers) whose causal LM is the same class as {}, tested there"
SKIPPED = {
    "dots3_note": _COMPOSITE.format("dots3_note_text"),
    "qwen3_5_moe": _COMPOSITE.format("qwen3_5_moe_text"),
    "qwen4_exp": _COMPOSITE.format("qwen4_exp_text"),
    "gemma4": "multimodal Gemma4ForConditionalGeneration; its decoder is gemma4_text, tested there",
}
# None is refused (UnsupportedModelError) and none fails in runtime code today; a model type that
# does would go in a table here with its reason (refusal message, or strict xfail).


def _cases():
    for model_type in interface_model_types():
        marks = [pytest.mark.skip(reason=SKIPPED[model_type])] if model_type in SKIPPED else []
        yield pytest.param(model_type, marks=marks)


@pytest.mark.parametrize("on_miss", ["wait", "host", "auto"])
@pytest.mark.parametrize("arch", _cases())
def test_load_matches_stock(checkpoints, arch, on_miss):
    """save_pretrained's checkpoint, loaded offloaded with a cache far below the experts,
    gives the stock model's logits and greedy tokens (batch 2), wherever misses run."""
    folder, stock = checkpoints[arch]
    top_k = max(layer.top_k for layer in find_moe_layers(stock))
    model, runtime = moe_prefetch.load(folder, device="cpu", cache_slots=top_k + 1, on_miss=on_miss)
    try:
        _check(stock, model, runtime, batch=2, on_miss=on_miss)
    finally:
        runtime.detach()


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss", "ernie4_5_moe"])
def test_batch_1(checkpoints, arch):
    folder, stock = checkpoints[arch]
    top_k = max(layer.top_k for layer in find_moe_layers(stock))
    model, runtime = moe_prefetch.load(folder, device="cpu", cache_slots=top_k + 1, on_miss="wait")
    try:
        _check(stock, model, runtime, batch=1)
    finally:
        runtime.detach()


def test_supported_is_what_passes():
    """SUPPORTED (named in errors and the README) is exactly the tested, passing set of the
    pinned transformers; an older release in the supported range lacks some of them, and a newer
    one's additions are named (`make test-latest` tests them)."""
    tested = set(interface_model_types()) - set(SKIPPED)
    new, gone = sorted(tested - set(SUPPORTED)), sorted(set(SUPPORTED) - tested)
    assert not new, f"new upstream architectures, not yet in SUPPORTED: {new}"
    if transformers.__version__ == pinned_version("transformers"):
        assert not gone, f"in SUPPORTED but not built by the pinned transformers: {gone}"


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_cache_slots_equal_top_k(checkpoints, arch):
    folder, stock = checkpoints[arch]
    top_k = max(layer.top_k for layer in find_moe_layers(stock))
    model, runtime = moe_prefetch.load(folder, device="cpu", cache_slots=top_k, on_miss="wait")
    try:
        _check(stock, model, runtime, batch=2)
        assert runtime.stats()["cache_slots"] == top_k
    finally:
        runtime.detach()


@pytest.mark.parametrize("on_miss", ["wait", "auto"])
@pytest.mark.parametrize("predictor", ["previous-token", "next-gate", "oracle"])
@pytest.mark.parametrize(
    "arch", ["mixtral", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss", "granitemoe", "qwen2_moe"]
)
def test_predictors_keep_outputs(checkpoints, arch, predictor, on_miss):
    folder, stock = checkpoints[arch]
    model, runtime = moe_prefetch.load(
        folder, device="cpu", cache_slots=3, predictor=predictor, lookahead=2, verify_slots=True, on_miss=on_miss
    )
    try:
        _check(stock, model, runtime, batch=2, on_miss=on_miss)
        if predictor == "next-gate":  # previous-token's picks are still resident in so small a model
            assert runtime.stats()["prefetch_issued"] > 0
    finally:
        runtime.detach()


@pytest.mark.parametrize("on_miss", ["wait", "host"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_bf16_waves_round_once(arch, on_miss):
    """Prefill through waves (or the host lane) in bf16: partial sums stay fp32 and round
    once, like the stock pass."""
    from tiny_models import make_model

    stock = make_model(arch).to(torch.bfloat16)
    ids = prompt(batch=2, length=12)
    with torch.no_grad():
        expected = stock(ids).logits
    top_k = max(layer.top_k for layer in find_moe_layers(stock))
    runtime = moe_prefetch.attach(stock, device="cpu", cache_slots=top_k, on_miss=on_miss)
    try:
        with torch.no_grad():
            got = stock(ids).logits
        if on_miss == "wait":
            assert max(r["waves"] for r in runtime.trace) > 1
        else:
            assert all(r["host"] for r in runtime.trace)
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
    finally:
        runtime.detach()


def _load_exact(folder, stock):
    top_k = max(layer.top_k for layer in find_moe_layers(stock))
    model, runtime = moe_prefetch.load(folder, device="cpu", cache_slots=top_k + 1, on_miss="wait")
    try:
        _check(stock, model, runtime, batch=2)
    finally:
        runtime.detach()


def test_names_transformers_renames_on_load(checkpoints):
    """ERNIE-4.5-MoE's save_pretrained writes `mlp.moe_statics.e_score_correction_bias`, which
    transformers renames on load to `mlp.gate.moe_statics...`: the runtime must apply the same
    conversion mapping, not refuse the checkpoint as incomplete."""
    from safetensors import safe_open

    folder, stock = checkpoints["ernie4_5_moe"]
    (file,) = folder.glob("*.safetensors")
    on_disk = set(safe_open(str(file), "pt").keys())
    assert any(k.endswith("mlp.moe_statics.e_score_correction_bias") for k in on_disk)
    assert not any(".gate.moe_statics." in k for k in on_disk)
    _load_exact(folder, stock)


def test_sharded_checkpoint(tmp_path):
    from tiny_models import make_model

    stock = make_model("mixtral")
    stock.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    _load_exact(tmp_path, stock)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_fused_checkpoint(tmp_path, arch):
    """A checkpoint written with the model's own fused names (`experts.gate_up_proj [E, 2I, H]`)."""
    from safetensors.torch import save_file
    from tiny_models import make_model

    stock = make_model(arch)
    stock.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in stock.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _load_exact(tmp_path, stock)


@pytest.mark.parametrize(
    "drop, message",
    [
        (lambda k: ".experts.5.w1." in k, "7 of 8 experts' tensors"),  # one expert's gate
        (lambda k: ".w3." in k, "do not convert"),  # every up projection
        (lambda k: ".experts." in k and "layers.1." in k, "no weights for model.layers.1.mlp.experts"),  # a layer
    ],
)
def test_incomplete_experts_refused(checkpoints, tmp_path, drop, message):
    """Missing expert tensors are a one-line CheckpointError, never a silently wrong expert."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = checkpoints["mixtral"]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if not drop(k)}, tmp_path / "model.safetensors", {"format": "pt"})
    with pytest.raises(moe_prefetch.CheckpointError, match=message) as err:
        moe_prefetch.load(tmp_path, device="cpu", cache_slots=3)
    assert "\n" not in str(err.value)
