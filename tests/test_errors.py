"""Bad input gets a typed error whose one-line message names the problem and the fix."""

import json

import pytest
import torch
from tiny_models import make_model, save_model
from transformers import LlamaConfig, LlamaForCausalLM

import moe_prefetch
from moe_prefetch import (
    CacheCapacityError,
    CheckpointError,
    ConfigError,
    ModelNotFoundError,
    UnsupportedModelError,
    parse_size,
)


def _one_line(err):
    assert "\n" not in str(err.value), str(err.value)


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        moe_prefetch.load("/no/such/model", device="cpu")
    _one_line(err)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json") as err:
        moe_prefetch.load(tmp_path, device="cpu")
    _one_line(err)


def test_dense_model_has_no_experts(tmp_path):
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="dense") as err:
        moe_prefetch.load(tmp_path, device="cpu", cache_slots=2)
    _one_line(err)


def test_corrupt_config(tmp_path):
    save_model("mixtral", tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON") as err:
        moe_prefetch.load(tmp_path, device="cpu")
    _one_line(err)


def test_truncated_safetensors(tmp_path):
    save_model("mixtral", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        moe_prefetch.load(tmp_path, device="cpu", cache_slots=2)
    _one_line(err)


def test_missing_shard(tmp_path):
    save_model("mixtral", tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="missing"):
        moe_prefetch.load(tmp_path, device="cpu", cache_slots=2)


def test_cache_below_top_k_leaves_the_model_whole():
    model = make_model("mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CacheCapacityError, match="raise cache_slots to >= 2") as err:
        moe_prefetch.attach(model, device="cpu", cache_slots=1)
    _one_line(err)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} changed by a refused attach"
    moe_prefetch.attach(model, device="cpu", cache_slots=2).detach()  # and it can be attached afterwards


def test_budget_larger_than_free_memory():
    with pytest.raises(CacheCapacityError, match="larger than"):
        moe_prefetch.attach(make_model("mixtral"), device="cpu", cache_budget="100000TiB")


@pytest.mark.parametrize("bad", ["6 parsecs", "abc", "-5GiB", "150%", ""])
def test_unparsable_sizes(bad):
    with pytest.raises(ConfigError):
        parse_size(bad, total=100)


def test_sizes_parse():
    assert parse_size("6GiB") == 6 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("75%", total=1000) == 750
    assert parse_size(4096) == 4096


def test_unknown_predictor():
    with pytest.raises(ConfigError, match="unknown predictor 'magic'; choose one of"):
        moe_prefetch.attach(make_model("mixtral"), device="cpu", cache_slots=2, predictor="magic")


def test_cuda_requested_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(moe_prefetch.DeviceError, match="no CUDA device"):
        moe_prefetch.attach(make_model("mixtral"), device="cuda", cache_slots=2)


def test_bad_dtype(tmp_path):
    save_model("mixtral", tmp_path)
    with pytest.raises(moe_prefetch.DeviceError, match="floating-point"):
        moe_prefetch.load(tmp_path, device="cpu", dtype="int8")


def test_out_of_memory_allocating_slots(monkeypatch):
    model = make_model("mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    real_zeros = torch.zeros

    def zeros(*args, **kwargs):
        if kwargs.get("device") is not None:  # the slot pool
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros)
    with pytest.raises(
        CacheCapacityError, match=r"out of device memory allocating 4 slots .* lower cache_slots"
    ) as err:
        moe_prefetch.attach(model, device="cpu", cache_slots=4)
    _one_line(err)
    monkeypatch.undo()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a failed attach must not lose weights"


def test_host_too_small_for_the_store(tmp_path, monkeypatch):
    import psutil

    save_model("mixtral", tmp_path)

    class Tiny:
        available = 1000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny)
    with pytest.raises(moe_prefetch.HostMemoryError, match="needs .* GiB but only") as err:
        moe_prefetch.load(tmp_path, device="cpu", cache_slots=2)
    _one_line(err)


def test_moe_outside_the_experts_interface_is_unsupported():
    from torch import nn

    class OldStyleMoE(nn.Module):  # experts as a ModuleList of MLPs, as older MoE code wrote them
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "my_old_moe"})()
            self.layers = nn.ModuleList(
                [nn.ModuleDict({"experts": nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])})]
            )

    with pytest.raises(
        UnsupportedModelError, match="not through transformers' experts interface; supported: mixtral"
    ) as err:
        moe_prefetch.attach(OldStyleMoE(), device="cpu", cache_slots=2)
    _one_line(err)


# -- issue 12: messages that fit where they are raised, checks before allocation -----------------
def test_expert_of_the_wrong_shape_is_named_before_anything_is_allocated(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    import moe_prefetch.model.loading as loading

    save_model("mixtral", tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    bad = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    rows, hidden = tensors[bad].shape
    tensors[bad] = torch.zeros(rows, hidden - 2)  # config.json says `hidden`
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    def no_store(*args, **kwargs):
        raise AssertionError("the host store was allocated before the shapes were checked")

    monkeypatch.setattr(loading, "HostStore", no_store)
    with pytest.raises(CheckpointError) as err:
        moe_prefetch.load(tmp_path, device="cpu", cache_slots=4)
    _one_line(err)
    for needle in (bad, f"({rows}, {hidden - 2})", f"({rows}, {hidden})", "model.safetensors"):
        assert needle in str(err.value), str(err.value)


def test_attach_names_itself_and_the_closest_keyword():
    model = make_model("mixtral")
    with pytest.raises(ConfigError, match=r"attach\(\) got an unknown keyword 'cache_slot'; did you mean cache_slots"):
        moe_prefetch.attach(model, device="cpu", cache_slot=6)
    assert all(p.numel() for p in model.parameters()), "a refused attach must leave the model whole"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_library_device_error_speaks_in_keywords():
    with pytest.raises(moe_prefetch.DeviceError) as err:
        moe_prefetch.attach(make_model("mixtral"), device="cuda")
    assert "device='cpu'" in str(err.value) and "--device" not in str(err.value)


@pytest.mark.parametrize(
    "options, needles, absent",
    [
        ({"cache_budget": "1KB"}, ["cache_budget='1KB'", "raise cache_budget"], "cache_slots"),
        ({"cache_slots": 1}, ["cache_slots=1", "top_k=2", "raise cache_slots"], "cache_budget"),
        ({"cache_budget": "0"}, ["cache_budget='0' must be positive"], "size '0'"),
        ({"device": "gpu"}, ["cuda:N"], "--device"),
    ],
)
def test_cache_and_device_messages_name_the_setting_given(options, needles, absent):
    with pytest.raises(moe_prefetch.MoePrefetchError) as err:
        moe_prefetch.attach(make_model("mixtral"), **{"device": "cpu", **options})
    _one_line(err)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert absent not in str(err.value), str(err.value)


def test_a_cache_below_top_k_times_layers_warns_once(caplog):
    """2 MoE layers at top-2 need 4 slots to reuse anything; 2 slots silently gave 0 hits."""
    model = make_model("mixtral")
    with caplog.at_level("WARNING", logger="moe_prefetch"):
        runtime = moe_prefetch.attach(model, device="cpu", cache_slots=2)
        model(torch.tensor([[3, 4, 5, 6]]))
        model(torch.tensor([[7]]))
    runtime.detach()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "below top_k x MoE layers = 2 x 2 = 4" in warnings[0], warnings
    assert "at least 4 slots" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="moe_prefetch"):
        moe_prefetch.attach(model, device="cpu", cache_slots=4).detach()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_load_names_itself_and_the_closest_keyword():
    with pytest.raises(ConfigError, match=r"load\(\) got an unknown keyword 'cache_slot'; did you mean cache_slots"):
        moe_prefetch.load("demo", device="cpu", cache_slot=6)
