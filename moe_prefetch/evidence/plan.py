"""What fits where: a model's anatomy and byte counts from its config alone (`model_size`, no
weights read), and how it sits on a device profile (`fit`, `slots_on`). Used by `inspect` (the
fit on every profile) and `run --profile` (the cache sized as on that device); the profiles
themselves are `runtime.profiles`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CacheCapacityError
from ..runtime.profiles import Profile
from ..runtime.sizing import RECOMMENDED_REASON, recommended_slots, smallest_budget, work_bytes


@dataclass(frozen=True)
class ModelSize:
    """A model's anatomy and byte counts, from its config alone (no weights read)."""

    path: str
    model_type: str
    architecture: str
    dtype: str  # the dtype sizes are given in: the checkpoint's, as it would run on CUDA
    num_layers: int  # decoder layers
    moe_layers: int
    experts_per_layer: int
    top_k: int
    expert_bytes: int
    non_expert_bytes: int  # every parameter outside the experts (embeddings, attention, norms, routers)
    # Bytes of one expert as stored and moved, by experts_dtype (compression.make_codec); "auto" is
    # the checkpoint's own format. Not hashed: a dict.
    expert_bytes_by_dtype: dict[str, int] = field(default_factory=dict, hash=False, compare=False)
    # The pool's working buffer by experts_dtype (sizing.work_bytes): a cache budget pays it first.
    work_bytes_by_dtype: dict[str, int] = field(default_factory=dict, hash=False, compare=False)
    # On a CPU device the model runs in float32 (folders.default_dtype), so its sizes differ:
    # (bytes per expert, working buffer) by experts_dtype there.
    cpu_bytes_by_dtype: dict[str, tuple[int, int]] = field(default_factory=dict, hash=False, compare=False)
    experts_dtype: str = "auto"  # the experts_dtype expert_bytes is given for

    def for_dtype(self, experts_dtype: str) -> ModelSize:
        """The same model with its experts stored as `experts_dtype`: slots and fits use those bytes."""
        return dataclasses.replace(
            self, expert_bytes=self.expert_bytes_by_dtype[experts_dtype], experts_dtype=experts_dtype
        )

    @property
    def work_bytes(self) -> int:
        return self.work_bytes_by_dtype.get(self.experts_dtype, 0)

    def smallest_budget(self, cpu: bool = False) -> int:
        """The smallest cache_budget that runs (top_k slots and the working buffer), as load
        checks it: on a GPU in `dtype`, or on a CPU device (`cpu`) in float32."""
        slot, work = self.cpu_bytes_by_dtype[self.experts_dtype] if cpu else (self.expert_bytes, self.work_bytes)
        return smallest_budget(self.min_slots, slot, work)

    @property
    def total_experts(self) -> int:
        return self.moe_layers * self.experts_per_layer

    @property
    def expert_total_bytes(self) -> int:
        return self.total_experts * self.expert_bytes

    @property
    def min_slots(self) -> int:
        return self.top_k

    @property
    def recommended_slots(self) -> tuple[int, str]:
        """Slots to aim for, and why."""
        return recommended_slots(self.top_k, self.moe_layers, self.total_experts), RECOMMENDED_REASON

    @property
    def all_miss_bytes_per_token(self) -> int:
        return self.top_k * self.moe_layers * self.expert_bytes


def model_size(path: str | Path) -> ModelSize:
    """Size a checkpoint folder (or "demo") from config.json, building it on the meta device."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..errors import UnsupportedModelError
    from ..experts.compression import make_codec
    from ..experts.dtypes import EXPERTS_DTYPES
    from ..experts.layout import find_moe_layers, spec_of
    from ..experts.native import expected_formats
    from ..model.folders import default_dtype, read_config, resolve_path

    folder = resolve_path(path)
    config = read_config(folder)
    dtype = default_dtype(config, torch.device("cuda"), None)  # what load() picks on a GPU
    with init_empty_weights():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as err:
            raise UnsupportedModelError(f"transformers cannot build this model: {str(err).splitlines()[0]}") from None
    layers = find_moe_layers(model)
    spec = spec_of(layers)
    native = expected_formats(config, spec)  # a quantized checkpoint's experts keep its format
    top_k = max(layer.top_k for layer in layers)

    def sizes(spec) -> dict[str, tuple[int, int]]:
        """(stored bytes, working buffer) per experts_dtype for experts decoded to spec.dtype."""
        codecs = {d: make_codec(spec, d, native) for d in EXPERTS_DTYPES}
        return {d: (c.nbytes, work_bytes(top_k, spec.nbytes, c.nbytes, not c.identity)) for d, c in codecs.items()}

    on_gpu = sizes(spec)
    by_dtype = {d: stored for d, (stored, _) in on_gpu.items()}
    expert_params = {id(p) for layer in layers for p in layer.experts.parameters(recurse=False)}
    non_expert = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_params)
    return ModelSize(
        path=str(folder),
        model_type=str(getattr(config, "model_type", "?")),
        architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
        dtype=str(dtype).removeprefix("torch."),
        num_layers=int(getattr(config, "num_hidden_layers", len(layers))),
        moe_layers=len(layers),
        experts_per_layer=max(layer.num_experts for layer in layers),
        top_k=top_k,
        expert_bytes=by_dtype["auto"],  # as load stores them by default: native formats stay packed
        non_expert_bytes=int(non_expert),
        expert_bytes_by_dtype=by_dtype,
        work_bytes_by_dtype={d: work for d, (_, work) in on_gpu.items()},
        cpu_bytes_by_dtype=sizes(dataclasses.replace(spec, dtype=torch.float32)),
    )


@dataclass(frozen=True)
class Fit:
    """How a model sits on one profile's device."""

    profile: str
    room_bytes: int  # usable device memory left after the non-expert weights
    slots: int  # expert slots that fit (capped at every expert)
    verdict: str  # "all resident", "offloaded" or "does not fit"
    all_miss_s_per_token: float  # decode time if every routed expert had to be copied in


def fit(profile: Profile, size: ModelSize) -> Fit:
    room = profile.usable_bytes - size.non_expert_bytes
    slots = max(0, min(size.total_experts, room // size.expert_bytes)) if room > 0 else 0
    if slots >= size.total_experts:
        verdict = "all resident"
    elif slots >= size.min_slots:
        verdict = "offloaded"
    else:
        verdict = "does not fit"
    return Fit(profile.name, room, slots, verdict, size.all_miss_bytes_per_token / profile.h2d_bandwidth_bytes_per_s)


def slots_on(profile: Profile, size: ModelSize) -> int:
    """Cache slots the model would get on `profile`: usable memory minus non-expert weights."""
    result = fit(profile, size)
    if result.verdict == "does not fit":
        raise CacheCapacityError(
            f"on {profile.name} the non-expert weights ({size.non_expert_bytes / 2**30:.2f} GiB) leave room for "
            f"{result.slots} expert slots but top_k is {size.top_k}; pick a larger profile"
        )
    return result.slots
