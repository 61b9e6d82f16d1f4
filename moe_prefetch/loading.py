"""`load`: a Hugging Face checkpoint folder straight into the runtime.

Expert tensors go from the safetensors files, one expert at a time, into the host store;
the whole fused expert tensor is never materialised, on the device or on the host. The
model skeleton is built with parameters on the meta device (buffers real), then only the
non-expert weights are read and placed on the device.
"""

from __future__ import annotations

import logging

from accelerate import init_empty_weights
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from .checkpoint import Checkpoint
from .compression import make_codec
from .config import RuntimeConfig, config_for
from .errors import CheckpointError, UnsupportedModelError
from .folders import _open, checkpoint_files, default_dtype, read_config, resolve_path
from .integration import resolve_device, wire
from .layout import find_moe_layers, spec_of
from .native import NativeExperts
from .quantized_copy import fill_experts
from .runtime import Runtime
from .store import HostStore, check_host_memory

logger = logging.getLogger(__name__)


def load(
    path,
    device: str = "auto",
    cache_slots: int | None = None,
    cache_budget=None,
    predictor: str = "none",
    lookahead: int = 1,
    dtype=None,
    predictor_path: str | None = None,
    **options,
) -> tuple[object, Runtime]:
    """Load a Hugging Face MoE checkpoint folder (or "demo") with its experts offloaded.

    Non-expert weights go to `device`; expert weights go from the safetensors files into the
    host store, one expert at a time. Returns `(model, runtime)`; the model works with
    `model(...)` and `model.generate(...)` exactly like the stock one.
    """
    config = config_for(
        "load",
        device=device,
        cache_slots=cache_slots,
        cache_budget=cache_budget,
        predictor=predictor,
        lookahead=lookahead,
        predictor_path=predictor_path,
        **options,
    )
    folder = resolve_path(path)
    if config.predictor == "m2r2" and config.predictor_path is None:
        config = RuntimeConfig(**{**config.__dict__, "predictor_path": str(folder / "m2r2_adapters.safetensors")})
    hf_config = read_config(folder)
    native = NativeExperts(hf_config)  # a quantized checkpoint: its experts stay in its format
    target, device_reason = resolve_device(config.device)
    dtype = default_dtype(hf_config, target, dtype)
    keys = checkpoint_files(folder)
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        except ValueError as err:
            raise UnsupportedModelError(f"transformers cannot build this model: {str(err).splitlines()[0]}") from None
    model.eval()
    layers = find_moe_layers(model)
    spec = spec_of(layers)
    checkpoint = Checkpoint(model, keys, _open, quantizer=native.quantizer)
    check_expert_shapes(checkpoint, layers, spec)
    store = HostStore(
        spec,
        [(layer.layer_idx, e) for layer in layers for e in range(layer.num_experts)],
        pin=target.type == "cuda",
        codec=make_codec(spec, config.experts_dtype, native.choose(checkpoint, layers, spec, config.experts_dtype)),
    )
    check_host_memory(store.nbytes)  # the store is address space so far: nothing is resident yet
    expert_names = {f"{layer.path}.{n}" for layer in layers for n in spec.names}
    try:
        if native.formats:  # the checkpoint's own quantized format, as its bytes
            for layer in layers:
                native.fill(store, checkpoint, layer, spec)
        else:  # quantized formats read a copy quantized once, or quantize here and write it
            fill_experts(store, layers, checkpoint, folder, config.experts_dtype)
        _load_dense(model, checkpoint, expert_names, target, dtype)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read the checkpoint ({err}); a file is corrupt or truncated") from None
    runtime = wire(model, layers, spec, store, config, target, device_reason)
    return model, runtime


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


def _load_dense(model, checkpoint: Checkpoint, expert_names: set[str], target, dtype) -> None:
    """Read every non-expert tensor onto `target`; fail on anything the model still lacks."""
    for key in checkpoint.unexpected:
        logger.warning("ignoring checkpoint tensor %s: the model has no such weight", key)
    state = {}
    for name in checkpoint.targets:
        if name in expert_names:
            continue
        for model_name, tensor in checkpoint.dense(name).items():
            state[model_name] = tensor.to(device=target, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in expert_names]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} weight(s), e.g. {missing[0]}; it is incomplete")
