"""Quantize once: the first `load` with int8/int4 experts writes a quantized copy, the next reads
it without encoding and computes the same; a changed checkpoint, other settings, a read-only
folder, a corrupt or half-written copy each lead to the right copy."""

import json
import logging
import os

import pytest
import torch
from tiny_models import make_model, prompt, save_model

import moe_prefetch
from moe_prefetch.experts.compression import Codec
from moe_prefetch.experts.layout import find_moe_layers
from moe_prefetch.model import quantized_copy


@pytest.fixture()
def encodes(monkeypatch):
    """Counts experts encoded (`Codec.encode` calls)."""
    calls = []
    original = Codec.encode

    def spy(self, tensors):
        calls.append(1)
        return original(self, tensors)

    monkeypatch.setattr(Codec, "encode", spy)
    return calls


@pytest.fixture()
def ckpt(tmp_path, monkeypatch):
    monkeypatch.setenv(quantized_copy.CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "ckpt"
    save_model("gpt_oss", folder)  # has expert biases: a copy mixes int4 and float parts
    return folder


def _load(folder, experts_dtype="int4"):
    """Greedy tokens, last logits and every stored row of one load."""
    model, runtime = moe_prefetch.load(folder, device="cpu", cache_slots=3, experts_dtype=experts_dtype)
    try:
        ids = prompt(length=5)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        rows = {key: runtime.store[key].clone() for key in runtime.store}
        return out.sequences, out.logits[-1], rows
    finally:
        runtime.detach()


def _copies(folder):
    return sorted(p for p in (folder / "moe_prefetch").glob("*") if not p.name.startswith("."))


def _same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_second_load_reads_the_copy_and_computes_the_same(ckpt, encodes, caplog):
    caplog.set_level(logging.INFO, logger="moe_prefetch.model.quantized_copy")
    first = _load(ckpt)
    assert len(encodes) == 2 * 8  # every expert of both MoE layers
    (copy,) = _copies(ckpt)
    assert copy.name.startswith("int4-") and f"wrote the copy to {copy}" in caplog.text
    manifest = json.loads((copy / "manifest.json").read_text())
    assert set(manifest["layers"]) == {"0", "1"} and manifest["experts_dtype"] == "int4"
    encodes.clear()
    second = _load(ckpt)
    assert encodes == []
    assert f"from the quantized copy at {copy}" in caplog.text
    _same(first, second)


def test_changed_checkpoint_or_dtype_writes_a_new_copy(ckpt, encodes):
    _load(ckpt)
    (copy,) = _copies(ckpt)
    before = json.loads((copy / "manifest.json").read_text())["source"]
    weights = ckpt / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # `touch`
    encodes.clear()
    _load(ckpt)
    assert len(encodes) == 16
    assert _copies(ckpt) == [copy]  # rewritten in place
    assert json.loads((copy / "manifest.json").read_text())["source"] != before
    encodes.clear()
    _load(ckpt, "int8")
    assert len(encodes) == 16 and len(_copies(ckpt)) == 2
    encodes.clear()
    _load(ckpt, "int8")
    _load(ckpt, "int4")
    assert encodes == []  # both copies valid side by side
    for experts_dtype in ("bf16", "auto"):  # a cast costs no more than reading: no copy
        _load(ckpt, experts_dtype)
    assert len(_copies(ckpt)) == 2


def test_read_only_checkpoint_folder_uses_the_cache(ckpt, encodes, monkeypatch, tmp_path):
    writable = quantized_copy._writable
    monkeypatch.setattr(quantized_copy, "_writable", lambda p: ckpt not in p.parents and writable(p))
    first = _load(ckpt)
    assert not (ckpt / "moe_prefetch").exists()
    (copy,) = [p for p in (tmp_path / "cache").glob("*/*") if not p.name.startswith(".")]
    assert copy.name.startswith("int4-") and (copy / "manifest.json").is_file()
    encodes.clear()
    _same(first, _load(ckpt))
    assert encodes == []


def _truncate(copy):
    file = copy / "layer_001.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


def _scramble_header(copy):
    file = copy / "layer_001.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"#" * 32  # same size, so only reading it finds out
    file.write_bytes(bytes(data))


def _scramble_tensor_shape(copy):
    """A header that parses but describes other tensors than the codec's (same file size)."""
    file = copy / "layer_000.safetensors"
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k.endswith("down_proj.sz"))
    header[name]["shape"] = list(reversed(header[name]["shape"]))
    raw = json.dumps(header, separators=(",", ":")).encode()
    file.write_bytes(data[:8] + raw.ljust(length) + data[8 + length :])


def _drop_manifest(copy):
    (copy / "manifest.json").unlink()


@pytest.mark.parametrize("damage", [_truncate, _scramble_header, _scramble_tensor_shape, _drop_manifest])
def test_corrupt_copy_is_ignored_and_rewritten(ckpt, encodes, caplog, damage):
    first = _load(ckpt)
    (copy,) = _copies(ckpt)
    damage(copy)
    encodes.clear()
    with caplog.at_level(logging.WARNING, logger="moe_prefetch.model.quantized_copy"):
        second = _load(ckpt)
    assert f"ignoring the quantized copy at {copy}" in caplog.text
    assert len(encodes) == 16
    _same(first, second)
    encodes.clear()
    _same(first, _load(ckpt))  # the rewritten copy reads
    assert encodes == []


def test_interrupted_write_leaves_no_copy(ckpt, encodes, monkeypatch):
    original = quantized_copy.Writer.layer

    def stop_at_layer_1(self, layer, experts):
        if layer.layer_idx == 1:
            raise KeyboardInterrupt
        original(self, layer, experts)

    monkeypatch.setattr(quantized_copy.Writer, "layer", stop_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        _load(ckpt)
    monkeypatch.undo()
    assert not list((ckpt / "moe_prefetch").iterdir())  # neither a copy nor its temporary folder
    first = _load(ckpt)
    encodes.clear()
    _same(first, _load(ckpt))
    assert encodes == []


def test_quantize_ahead_of_time(ckpt, encodes):
    done = []
    info = quantized_copy.quantize(ckpt, "int4", device="cpu", progress=lambda *p: done.append(p))
    assert done == [(n, 16) for n in range(1, 17)] and not info.reused and info.path.parent == ckpt / "moe_prefetch"
    layers = find_moe_layers(make_model("gpt_oss"))  # the checkpoint's model: its experts as saved (fp32)
    assert info.source_bytes == sum(p.nbytes for layer in layers for p in layer.experts.parameters(recurse=False))
    assert info.copy_bytes == sum(f.stat().st_size for f in info.path.iterdir())
    assert info.copy_bytes < info.source_bytes / 3
    encodes.clear()
    _load(ckpt)
    assert encodes == []  # load reads what quantize wrote
    again = quantized_copy.quantize(ckpt, "int4", device="cpu")
    assert again.reused and again.path == info.path and encodes == []


def test_no_room_beside_uses_the_cache_and_no_place_still_loads(ckpt, encodes, monkeypatch, tmp_path, caplog):
    free = quantized_copy._free_bytes
    monkeypatch.setattr(quantized_copy, "_free_bytes", lambda p: 1000 if ckpt in p.parents else free(p))
    _load(ckpt)
    assert not (ckpt / "moe_prefetch").exists() and list((tmp_path / "cache").glob("*/int4-*"))
    monkeypatch.setattr(quantized_copy, "_free_bytes", lambda p: 1000)
    encodes.clear()
    with caplog.at_level(logging.WARNING, logger="moe_prefetch.model.quantized_copy"):
        _load(ckpt, "int8")
    assert len(encodes) == 16 and "no writable place with room" in caplog.text
    assert not list((tmp_path / "cache").glob("*/int8-*")) and not (ckpt / "moe_prefetch").exists()


def test_shipped_demo_copies_go_to_the_cache_not_the_package(monkeypatch, tmp_path):
    """The demos live inside the installed package: a copy of their experts is data, and goes to
    the cache folder even where the package folder is writable (a venv, a dev checkout)."""
    from moe_prefetch.model.folders import resolve_path

    monkeypatch.setenv(quantized_copy.CACHE_ENV, str(tmp_path))
    demo = resolve_path("demo")
    model, runtime = moe_prefetch.load("demo", device="cpu", cache_slots=12, experts_dtype="int8")
    runtime.detach()
    assert not (demo / "moe_prefetch").exists()
    assert list(tmp_path.rglob(quantized_copy.MANIFEST))
