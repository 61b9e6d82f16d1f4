"""Checkpoint folders: the shipped demo names, config.json, which safetensors file holds each
tensor, and the dtype a model runs in. No runtime here, so sizing (`evidence.anatomy`) and
`load` can both use it without importing each other."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, DeviceError, ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    import torch

# torch and transformers load inside the functions that need them: the CLI resolves the model
# path (a typo, a file for a folder) before paying seconds for them.

PACKAGE_DIR = Path(__file__).parents[1]  # moe_prefetch/: the demos are data beside its subpackages
DEMO_DIR = PACKAGE_DIR / "demo"
DEMO_FINE_DIR = PACKAGE_DIR / "demo_fine"
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
    if path.is_file() and path.name == "config.json":
        return path.parent  # the folder it describes
    if path.is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} is a file, not a model folder; pass the folder that holds config.json and the weights"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} is not a model folder (it has no config.json); pass a Hugging Face checkpoint folder"
        )
    return path


def read_config(path: Path):
    from transformers import AutoConfig

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
    import torch

    if dtype is not None:
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DeviceError(f"dtype {dtype!r} is not a floating-point torch dtype; use float32, bfloat16 or float16")
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("this GPU cannot run bfloat16; pass dtype='float16'")
        return dtype
    saved = getattr(config, "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    if device.type == "cpu":
        # The checkpoint's own dtype: a bf16 checkpoint built in fp32 reads twice the expert bytes
        # per token and converts them on every use (47% of a bf16 host-lane run, issue 19). Not
        # float16, whose matmuls torch's CPU kernels emulate (and whose packed kernels are slow):
        # fp32 there, as for a checkpoint that names no dtype.
        return saved if saved in (torch.bfloat16, torch.float32) else torch.float32
    return saved if isinstance(saved, torch.dtype) else torch.bfloat16
