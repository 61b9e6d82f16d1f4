"""`load`: a Hugging Face checkpoint folder straight into the runtime.

Expert tensors go from the safetensors files, one expert at a time, into the host store;
the whole fused expert tensor is never materialised, on the device or on the host. The
model skeleton is built with parameters on the meta device (buffers real), then only the
non-expert weights are read and placed on the device.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from .config import RuntimeConfig
from .errors import CheckpointError, DeviceError, ModelNotFoundError, UnsupportedModelError
from .integration import resolve_device, wire
from .layout import CheckpointExperts, find_moe_layers, rename_key, spec_of
from .runtime import Runtime
from .store import HostStore, check_host_memory

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_FINE_DIR = Path(__file__).parent / "demo_fine"
# Shipped demo models by name: Mixtral-style 8 experts top-2, and Qwen3-MoE 64 experts top-8.
DEMOS = {"demo": DEMO_DIR, "demo-fine": DEMO_FINE_DIR}


def resolve_path(path: str | Path) -> Path:
    """'demo' and 'demo-fine' are the shipped demo models; anything else must be a checkpoint folder."""
    if str(path) in DEMOS:
        folder = DEMOS[str(path)]
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(
                f"the {path} model is not built in this checkout; build it with `python scripts/train_demo_model.py` "
                f"(see {folder.name}/README.md)"
            )
        path = folder
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model path {str(path)!r} does not exist; pass a checkpoint folder, 'demo' or 'demo-fine'"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} is not a model folder (no config.json); pass a Hugging Face checkpoint folder"
        )
    return path


def read_config(path: Path):
    try:
        json.loads((path / "config.json").read_text())
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON ({err}); restore the file") from None
    except (ValueError, KeyError) as err:
        raise UnsupportedModelError(f"cannot read {path / 'config.json'}: {str(err).splitlines()[0]}") from None


def checkpoint_files(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index (sharded) or the files' headers."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is corrupt ({err!r}); restore it from the original checkpoint") from None
        missing = {f for f in weight_map.values() if not (path / f).is_file()}
        if missing:
            raise CheckpointError(
                f"shard(s) {', '.join(sorted(missing))} named in {index.name} are missing; download them"
            )
        return {name: str(path / f) for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{str(path)!r} has no .safetensors files; convert the checkpoint to safetensors")
    keys = {}
    for file in files:
        handle = _open(str(file))
        if (handle.metadata() or {}).get("format", "").startswith("moe-prefetch/"):
            continue  # our own files beside the weights (M2R2 adapters), not part of the model
        keys.update({name: str(file) for name in handle.keys()})
    return keys


@cache
def _open_cached(file: str):
    return safe_open(file, framework="pt")


def _open(file: str):
    try:
        return _open_cached(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is corrupt or truncated ({err}); download it again") from None


def default_dtype(config, device: torch.device, dtype) -> torch.dtype:
    if dtype is not None:
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DeviceError(f"dtype {dtype!r} is not a floating-point torch dtype; use float32, bfloat16 or float16")
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("this GPU cannot run bfloat16; pass dtype='float16'")
        return dtype
    if device.type == "cpu":
        return torch.float32  # half-precision matmuls on CPU are slow or missing
    saved = getattr(config, "dtype", None)
    return saved if isinstance(saved, torch.dtype) else torch.bfloat16


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
    config = RuntimeConfig(
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
    reader = CheckpointExperts(keys, _open)
    check_host_memory(sum(layer.num_experts for layer in layers) * spec.nbytes)
    store = HostStore(
        spec, [(layer.layer_idx, e) for layer in layers for e in range(layer.num_experts)], pin=target.type == "cuda"
    )
    expert_keys: set[str] = set()
    for layer in layers:
        kind, prefix = reader.resolve(layer.path, spec)
        expert_keys |= reader.expert_keys(kind, prefix, layer.num_experts, spec)
        for e in range(layer.num_experts):
            store.write((layer.layer_idx, e), reader.read(kind, prefix, e, spec))
    _load_dense(model, keys, expert_keys, layers, target, dtype)
    runtime = wire(model, layers, spec, store, config, target, device_reason)
    return model, runtime


def _load_dense(model, keys: dict[str, str], expert_keys: set[str], layers, target, dtype) -> None:
    """Read every non-expert tensor onto `target`; fail on anything the model still lacks."""
    expert_params = {f"{layer.path}.{n}" for layer in layers for n, _ in layer.experts.named_parameters(recurse=False)}
    model_keys = set(model.state_dict().keys())
    state = {}
    for key, file in keys.items():
        if key in expert_keys:
            continue
        name = rename_key(key, model_keys)
        if name is None:
            logger.warning("ignoring checkpoint tensor %s: the model has no such weight", key)
            continue
        try:
            tensor = _open(file).get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {key} from {file} ({err}); the file is corrupt or truncated") from None
        state[name] = tensor.to(device=target, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in expert_params]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} weight(s), e.g. {missing[0]}; it is incomplete")
