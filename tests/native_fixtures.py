"""Tiny quantized checkpoints in the layouts real ones are published in (none can be downloaded
here): a random tiny model, saved by `save_pretrained` (the per-expert or fused names the
checkpoints use), its weights quantized as the quantized checkpoints store them, config.json
with their `quantization_config`.

- `mxfp4_checkpoint`: GPT-OSS. `experts.{gate_up,down}_proj_blocks` uint8 `[E, out, in/32, 16]`
  and `_scales` uint8 `[E, out, in/32]`, the rest bf16 (as openai/gpt-oss-20b ships).
- `fp8_checkpoint`: DeepSeek-V3 / Qwen3-FP8. Every projection weight (attention, experts,
  shared experts) float8_e4m3fn with `weight_scale_inv` fp32 per block; router, norms,
  embeddings and head unquantized.

Each returns the all-resident reference: the same model with every quantized weight replaced
by its decoded value (built by transformers from an unquantized copy of those values).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_model, sized_config
from transformers import AutoModelForCausalLM

from moe_prefetch.experts.native import MXFP4, FP8Block

# Sizes that are multiples of the MXFP4 block (32) and give several FP8 blocks of 32 per matrix.
SIZES = {
    "gpt_oss": dict(hidden_size=64, intermediate_size=64),
    "deepseek_v3": dict(hidden_size=64, moe_intermediate_size=64),
    "qwen3_moe": dict(hidden_size=64, moe_intermediate_size=64),
}
GPT_OSS_QUANT = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
_FP8_WEIGHT = re.compile(r"\.layers\.\d+\..*(proj|proj_with_mqa)\.weight$")  # projections; not router, norms, head


def fp8_quant(block) -> dict:
    return {"quant_method": "fp8", "weight_block_size": list(block), "fmt": "e4m3", "activation_scheme": "dynamic"}


def _saved(model_type: str, seed: int, sizes=None):
    """The tiny model and its `save_pretrained` tensors and config."""
    model = make_model(model_type, seed, config=sized_config(model_type, **(sizes or SIZES[model_type])))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors = {}
        for file in sorted(Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(file))
        config = json.loads((Path(tmp) / "config.json").read_text())
        generation = (Path(tmp) / "generation_config.json").read_text()
    return model, tensors, config, generation


def _write(folder: Path, tensors: dict, config: dict, generation: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(generation)


def _reference(folder: Path, tensors: dict, config: dict, generation: str):
    """The model transformers builds from the decoded (unquantized) tensors."""
    _write(folder, tensors, config, generation)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    shutil.rmtree(folder)
    return model


def fp8_checkpoint(model_type: str, folder: Path, block=(32, 32), seed: int = 0, sizes=None):
    """Write a block-scaled FP8 checkpoint of a tiny `model_type` (`sizes`: config fields other
    than `SIZES`) to `folder`; returns the reference."""
    _, tensors, config, generation = _saved(model_type, seed, sizes)
    fmt = FP8Block(block)
    stored, decoded = {}, {}
    for key, value in tensors.items():
        if not _FP8_WEIGHT.search(key):
            stored[key] = decoded[key] = value
            continue
        parts = fmt.encode(value)
        stored[key], stored[f"{key}_scale_inv"] = parts["weight"], parts["scale_inv"]
        decoded[key] = torch.empty_like(value)
        fmt.decode(parts, decoded[key])
    _write(folder, stored, {**config, "quantization_config": fp8_quant(block)}, generation)
    return _reference(folder.with_name(folder.name + "-ref"), decoded, config, generation)


def mxfp4_checkpoint(folder: Path, seed: int = 0):
    """Write a GPT-OSS MXFP4 checkpoint of a tiny gpt_oss to `folder`; returns the reference."""
    _, tensors, config, generation = _saved("gpt_oss", seed)
    fmt = MXFP4()
    stored, decoded = {}, {}
    for key, value in tensors.items():
        if re.search(r"experts\.(gate_up|down)_proj$", key):  # [E, in, out] in the model and save_pretrained
            parts = [fmt.encode(w) for w in value]
            stored[f"{key}_blocks"] = torch.stack([p["blocks"] for p in parts])
            stored[f"{key}_scales"] = torch.stack([p["scales"] for p in parts])
            decoded[key] = torch.empty_like(value)
            for e, p in enumerate(parts):
                fmt.decode(p, decoded[key][e])
        else:
            stored[key] = value.to(torch.bfloat16)
            decoded[key] = stored[key].float()
    _write(folder, stored, {**config, "dtype": "bfloat16", "quantization_config": GPT_OSS_QUANT}, generation)
    return _reference(folder.with_name(folder.name + "-ref"), decoded, config, generation)
