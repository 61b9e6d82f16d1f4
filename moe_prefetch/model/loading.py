"""`load`: a Hugging Face checkpoint folder straight into the runtime.

Expert tensors go from the safetensors files, one expert at a time, into the host store;
the whole fused expert tensor is never materialised, on the device or on the host. The
model skeleton is built with parameters on the meta device (buffers real), then only the
non-expert weights are read and placed on the device.
"""

from __future__ import annotations

import logging

from safetensors import SafetensorError

from ..errors import CheckpointError
from ..experts.compression import make_codec
from ..runtime.config import RuntimeConfig, config_for
from ..runtime.runtime import Runtime
from ..runtime.store import HostStore, check_host_memory
from .checkpoint import Checkpoint
from .folders import resolve_path
from .integration import resolve_device, wire
from .quantized_copy import fill_experts
from .skeleton import check_expert_shapes, open_skeleton

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
    target, device_reason = resolve_device(config.device)
    skeleton = open_skeleton(folder, target, dtype)
    model, layers, spec, checkpoint, native = (
        skeleton.model,
        skeleton.layers,
        skeleton.spec,
        skeleton.checkpoint,
        skeleton.native,
    )
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
        _load_dense(model, checkpoint, expert_names, target, skeleton.dtype)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read the checkpoint ({err}); a file is corrupt or truncated") from None
    runtime = wire(model, layers, spec, store, config, target, device_reason)
    return model, runtime


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
