"""A checkpoint folder as `load` and `quantize` both open it: the model built from config.json
on the meta device (buffers real, no weights), its MoE layers and expert layout, and the
checkpoint's tensors under the model's names (through a quantized checkpoint's own quantizer,
in dequantize mode, where it has one: native.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from ..errors import CheckpointError, UnsupportedModelError
from ..experts.layout import ExpertSpec, MoELayer, find_moe_layers, spec_of
from ..experts.native import NativeExperts
from .checkpoint import Checkpoint
from .folders import _open, checkpoint_files, default_dtype, read_config


@dataclass
class Skeleton:
    model: torch.nn.Module
    layers: list[MoELayer]
    spec: ExpertSpec
    checkpoint: Checkpoint
    native: NativeExperts
    dtype: torch.dtype


def _empty_model(hf_config, dtype):
    with init_empty_weights(include_buffers=False):
        try:
            return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        except ValueError as err:
            raise UnsupportedModelError(f"transformers cannot build this model: {str(err).splitlines()[0]}") from None


def check_moe(hf_config) -> None:
    """Raise UnsupportedModelError for a config that builds a dense model (or experts outside the
    experts interface), as `load` would, without reading a weight: callers check it before
    anything that would fail for a lesser reason first (a missing tokenizer)."""
    find_moe_layers(_empty_model(hf_config, torch.float32))


def open_skeleton(folder: Path, target: torch.device, dtype=None) -> Skeleton:
    """The model of `folder` for `target` (dtype as `load` picks it), with no weights read."""
    hf_config = read_config(folder)
    native = NativeExperts(hf_config)  # a quantized checkpoint: its experts stay in its format
    dtype = default_dtype(hf_config, target, dtype)
    keys = checkpoint_files(folder)
    model = _empty_model(hf_config, dtype)
    model.eval()
    layers = find_moe_layers(model)
    checkpoint = Checkpoint(model, keys, _open, quantizer=native.quantizer)
    return Skeleton(model, layers, spec_of(layers), checkpoint, native, dtype)


def check_expert_shapes(checkpoint: Checkpoint, layers, spec) -> None:
    """Every expert tensor's shape, from the safetensors headers, before anything is allocated:
    a fused tensor must be `[num_experts, *shape]`; per-expert tensors must all have the shape
    of expert 0's, and expert 0 must convert to what config.json builds. A mismatch names the
    tensor, both shapes and its file."""

    def header(key: str) -> tuple[int, ...]:
        return tuple(_open(checkpoint.keys[key]).get_slice(key).get_shape())

    def refuse(key: str, actual, expected) -> None:
        raise CheckpointError(
            f"expert tensor {key} in {checkpoint.keys[key]} has shape {actual} but config.json implies "
            f"{expected}; the weights and config.json belong to different models"
        )

    for layer in layers:
        for pname, shape in zip(spec.names, spec.shapes):
            target = checkpoint.targets.get(f"{layer.path}.{pname}")
            if target is None:
                continue  # reported as missing when the expert is read
            for pattern, keys in target.sources.items():
                if "*" not in pattern:  # fused: [E, ...] in one tensor
                    actual = header(keys[0])
                    if target.converter is None and actual != (layer.num_experts, *shape):
                        refuse(keys[0], actual, (layer.num_experts, *shape))
                    if actual[:1] != (layer.num_experts,):
                        refuse(keys[0], actual, (layer.num_experts, *actual[1:]))
                    continue
                first = header(keys[0])
                for key in keys[1:]:
                    if header(key) != first:
                        refuse(key, header(key), first)
        checkpoint.expert(layer.path, 0, layer.num_experts, spec)  # expert 0 converts to the config's shapes
