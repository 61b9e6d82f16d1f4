"""Hardware profiles: what a device can hold and how fast experts reach it.

A profile is one TOML file (schema in moe_prefetch/hardware_profiles/README.md). They are found, first match by
name wins, in: the folders named in $MOE_PREFETCH_PROFILES (os.pathsep-separated), the
user folder ($XDG_CONFIG_HOME or ~/.config)/moe-prefetch/profiles, then the
hardware_profiles/ folder shipped inside the package. Host profiles (the CPU and DRAM that compute
experts missing from the device) live in a `host/` subfolder of each, searched in the same order, and
are chosen separately from the device; `lane_costs` combines one of each for the placement cost model.
This module also sizes a model without loading its weights (`model_size`), says what fits on a profile
(`fit`) and measures a CUDA device into a new profile (`calibrate`); calibration.py measures the host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CacheCapacityError, ConfigError, DeviceError
from .placement import LaneCosts
from .sizing import RECOMMENDED_REASON, recommended_slots

if TYPE_CHECKING:
    import torch

# torch loads inside the functions that measure or size a model: listing and reading profiles
# (`moe-prefetch profiles`, `--help`) must not pay seconds for it.

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "hardware_profiles"
NUMBERS = (
    "device_memory_bytes",
    "usable_fraction",
    "h2d_bandwidth_bytes_per_s",
    "hbm_bandwidth_bytes_per_s",
    "peak_bf16_flops",
)
KEYS = ("name", "description", *NUMBERS, "interconnect")
CALIBRATION_SIZES_MIB = (1, 4, 16, 64, 256)
# Share of the free memory seen at calibration that a profile calls usable: the rest is for
# activations, KV cache and allocator slack, as vLLM's default --gpu-memory-utilization of 0.9.
CALIBRATION_HEADROOM = 0.90


@dataclass(frozen=True)
class Profile:
    """One device, as in profiles/*.toml. `path` is where it was read from (None if built)."""

    name: str
    description: str
    device_memory_bytes: int
    usable_fraction: float
    h2d_bandwidth_bytes_per_s: float
    hbm_bandwidth_bytes_per_s: float
    peak_bf16_flops: float
    interconnect: str
    sources: dict[str, str] = field(compare=False)
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f" in {self.path}" if self.path else ""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"profile name {self.name!r}{where} must be letters, digits, '.', '_' or '-'")
        for key in NUMBERS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"profile {self.name!r}{where}: {key} = {value!r} must be a positive number")
        if not isinstance(self.device_memory_bytes, int):
            raise ConfigError(f"profile {self.name!r}{where}: device_memory_bytes must be an integer byte count")
        if not 0 < self.usable_fraction <= 1:
            raise ConfigError(
                f"profile {self.name!r}{where}: usable_fraction = {self.usable_fraction} must be in (0, 1]"
            )
        missing = [k for k in NUMBERS if not str(self.sources.get(k, "")).strip()]
        if missing:
            raise ConfigError(f"profile {self.name!r}{where}: [sources] lacks {', '.join(missing)}; cite each number")

    @property
    def usable_bytes(self) -> int:
        return int(self.device_memory_bytes * self.usable_fraction)


def user_dir() -> Path:
    """The user's profile folder, where `calibrate` writes by default."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "moe-prefetch" / "profiles"


def profile_dirs() -> list[Path]:
    """Folders searched for profiles, highest precedence first."""
    env = [Path(p).expanduser() for p in os.environ.get("MOE_PREFETCH_PROFILES", "").split(os.pathsep) if p]
    return [*env, user_dir(), SHIPPED_DIR]


def read_profile(path: str | Path) -> Profile:
    """Parse and validate one profile file. Raises ConfigError naming the file and the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read profile {path}: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"profile {path} is not valid TOML ({err}); fix the file") from None
    missing = [k for k in (*KEYS, "sources") if k not in data]
    if missing:
        raise ConfigError(f"profile {path} lacks {', '.join(missing)}; see hardware_profiles/README.md for the schema")
    if not isinstance(data["sources"], dict):
        raise ConfigError(f"profile {path}: sources must be a table ([sources])")
    if data["name"] != path.stem:
        raise ConfigError(f"profile {path} is named {data['name']!r}; name must match the file name {path.stem!r}")
    return Profile(**{k: data[k] for k in KEYS}, sources=dict(data["sources"]), path=path)


def list_profiles() -> list[Profile]:
    """Every profile found, by name; a name in a higher-precedence folder hides the others.
    Files that do not parse are skipped with a warning (`load_profile` reports them)."""
    found: dict[str, Profile] = {}
    for folder in profile_dirs():
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else ():
            if path.stem in found:
                continue
            try:
                found[path.stem] = read_profile(path)
            except ConfigError as err:
                logger.warning("skipping profile: %s", err)
    return sorted(found.values(), key=lambda p: p.name)


def load_profile(name: str) -> Profile:
    """A profile by name (searched in `profile_dirs`) or by path to a .toml file."""
    if name.endswith(".toml") or os.sep in name:
        return read_profile(Path(name).expanduser())
    for folder in profile_dirs():
        path = folder / f"{name}.toml"
        if path.is_file():
            return read_profile(path)
    known = ", ".join(p.name for p in list_profiles()) or "none"
    raise ConfigError(f"unknown profile {name!r}; known profiles: {known} (or pass a .toml path)")


def to_toml(profile: Profile) -> str:
    """The profile in the schema of hardware_profiles/README.md (TOML basic strings are JSON strings)."""
    lines = [f"{k} = {json.dumps(getattr(profile, k))}" for k in ("name", "description")]
    lines += [f"device_memory_bytes = {profile.device_memory_bytes}", f"usable_fraction = {profile.usable_fraction!r}"]
    lines += [f"{k} = {float(getattr(profile, k)):.6g}".replace("e+", "e") for k in NUMBERS[2:]]
    lines += [f"interconnect = {json.dumps(profile.interconnect)}", "", "[sources]"]
    lines += [f"{k} = {json.dumps(profile.sources[k])}" for k in NUMBERS]
    return "\n".join(lines) + "\n"


def write_profile(profile: Profile, path: str | Path) -> Path:
    """Write atomically (temp file, then rename), creating the folder."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(to_toml(profile))
        os.replace(tmp, path)
    except OSError as err:
        raise ConfigError(f"cannot write profile {path}: {err.strerror or err}; choose another --out") from None
    return path


# -- host profiles ------------------------------------------------------------------
HOST_NUMBERS = (
    "physical_cores",
    "dram_peak_bytes_per_s",
    "dram_bandwidth_bytes_per_s",
    "expert_bytes_per_s",
    "host_flops",
    "expert_call_overhead_s",
)
HOST_KEYS = ("name", "description", *HOST_NUMBERS, "compute_dtype", "unified_memory")
HOST_DTYPES = ("bfloat16", "float16", "float32")
# default_lane_costs: an achieved pinned copy over PCIe 4.0 x16, the README's rule of thumb
# (about 80% of the 31.5 GB/s per-direction peak).
PCIE4_X16_BYTES_PER_S = 25.0e9


@dataclass(frozen=True)
class HostProfile:
    """One host (CPU + DRAM) as in hardware_profiles/host/*.toml: how fast it computes experts
    that are not on the device. `host_flops` is in `compute_dtype`; `unified_memory` means the
    device reads the same DRAM, so an upload costs no link time."""

    name: str
    description: str
    physical_cores: int
    dram_peak_bytes_per_s: float  # theoretical: channels x 8 bytes x MT/s
    dram_bandwidth_bytes_per_s: float  # achieved by a large copy (read + write bytes)
    expert_bytes_per_s: float  # expert weight bytes/s one batch-1 expert call achieves
    host_flops: float  # achieved by expert matmuls with many tokens, in compute_dtype
    expert_call_overhead_s: float  # fixed cost of one expert call (op dispatch, thread wake-up)
    compute_dtype: str
    unified_memory: bool
    sources: dict[str, str] = field(compare=False)
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f" in {self.path}" if self.path else ""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"host profile name {self.name!r}{where} must be letters, digits, '.', '_' or '-'")
        for key in HOST_NUMBERS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"host profile {self.name!r}{where}: {key} = {value!r} must be a positive number")
        if not isinstance(self.physical_cores, int):
            raise ConfigError(f"host profile {self.name!r}{where}: physical_cores must be an integer")
        if self.dram_bandwidth_bytes_per_s > self.dram_peak_bytes_per_s:
            raise ConfigError(
                f"host profile {self.name!r}{where}: dram_bandwidth_bytes_per_s (achieved) exceeds "
                "dram_peak_bytes_per_s; the peak is channels x 8 bytes x MT/s"
            )
        if self.compute_dtype not in HOST_DTYPES:
            raise ConfigError(
                f"host profile {self.name!r}{where}: compute_dtype {self.compute_dtype!r} must be one of "
                f"{', '.join(HOST_DTYPES)}"
            )
        if not isinstance(self.unified_memory, bool):
            raise ConfigError(f"host profile {self.name!r}{where}: unified_memory must be true or false")
        missing = [k for k in HOST_NUMBERS if not str(self.sources.get(k, "")).strip()]
        if missing:
            raise ConfigError(
                f"host profile {self.name!r}{where}: [sources] lacks {', '.join(missing)}; cite each number"
            )


def host_profile_dirs() -> list[Path]:
    """Folders searched for host profiles, highest precedence first: `host/` in each profile folder."""
    return [folder / "host" for folder in profile_dirs()]


def read_host_profile(path: str | Path) -> HostProfile:
    """Parse and validate one host profile file. Raises ConfigError naming the file and the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read host profile {path}: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"host profile {path} is not valid TOML ({err}); fix the file") from None
    missing = [k for k in (*HOST_KEYS, "sources") if k not in data]
    if missing:
        raise ConfigError(
            f"host profile {path} lacks {', '.join(missing)}; see hardware_profiles/README.md for the schema"
        )
    if not isinstance(data["sources"], dict):
        raise ConfigError(f"host profile {path}: sources must be a table ([sources])")
    if data["name"] != path.stem:
        raise ConfigError(f"host profile {path} is named {data['name']!r}; name must match the file name {path.stem!r}")
    return HostProfile(**{k: data[k] for k in HOST_KEYS}, sources=dict(data["sources"]), path=path)


def list_host_profiles() -> list[HostProfile]:
    """Every host profile found, by name, as `list_profiles` does for devices."""
    found: dict[str, HostProfile] = {}
    for folder in host_profile_dirs():
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else ():
            if path.stem in found:
                continue
            try:
                found[path.stem] = read_host_profile(path)
            except ConfigError as err:
                logger.warning("skipping host profile: %s", err)
    return sorted(found.values(), key=lambda p: p.name)


def load_host_profile(name: str) -> HostProfile:
    """A host profile by name (searched in `host_profile_dirs`) or by path to a .toml file."""
    if name.endswith(".toml") or os.sep in name:
        return read_host_profile(Path(name).expanduser())
    for folder in host_profile_dirs():
        path = folder / f"{name}.toml"
        if path.is_file():
            return read_host_profile(path)
    known = ", ".join(p.name for p in list_host_profiles()) or "none"
    raise ConfigError(f"unknown host profile {name!r}; known host profiles: {known} (or pass a .toml path)")


def host_to_toml(host: HostProfile) -> str:
    """The host profile in the schema of hardware_profiles/README.md."""
    lines = [f"{k} = {json.dumps(getattr(host, k))}" for k in ("name", "description")]
    lines.append(f"physical_cores = {host.physical_cores}")
    lines += [f"{k} = {float(getattr(host, k)):.6g}".replace("e+", "e") for k in HOST_NUMBERS[1:]]
    lines += [
        f"compute_dtype = {json.dumps(host.compute_dtype)}",
        f"unified_memory = {json.dumps(host.unified_memory)}",
    ]
    lines += ["", "[sources]", *(f"{k} = {json.dumps(v)}" for k, v in host.sources.items())]
    return "\n".join(lines) + "\n"


def write_host_profile(host: HostProfile, path: str | Path) -> Path:
    """Write atomically (temp file, then rename), creating the folder."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(host_to_toml(host))
        os.replace(tmp, path)
    except OSError as err:
        raise ConfigError(
            f"cannot write host profile {path}: {err.strerror or err}; choose another --host-out"
        ) from None
    return path


def lane_costs(device: Profile, host: HostProfile) -> LaneCosts:
    """The placement cost model's lane speeds from a device and a host profile. A unified-memory
    host (Jetson) makes the link free (`math.inf` bytes/s): the device reads the same DRAM."""
    if host.unified_memory and "unified" not in device.interconnect.lower():
        logger.warning(
            "host profile %s has unified memory but device profile %s has a %s link; the link is taken as free",
            host.name,
            device.name,
            device.interconnect,
        )
    return LaneCosts(
        link_bytes_per_s=math.inf if host.unified_memory else float(device.h2d_bandwidth_bytes_per_s),
        host_bytes_per_s=float(host.expert_bytes_per_s),
        host_flops=float(host.host_flops),
        host_call_s=float(host.expert_call_overhead_s),
        device_bytes_per_s=float(device.hbm_bandwidth_bytes_per_s),
        device_flops=float(device.peak_bf16_flops),
    )


def default_lane_costs(device: Profile | None = None, host: HostProfile | None = None) -> LaneCosts:
    """Lane speeds from the profiles given and, for the rest, a modest desktop, so no lane is
    assumed faster than common hardware gives: the shipped rtx3060-12gb device (the smallest
    shipped GPU: 360 GB/s, 25.5 TFLOP/s bf16) on a PCIe 4.0 x16 link (25 GB/s achieved) and the
    shipped ddr4-3200-2ch desktop host. Defaults come from the shipped files, never the user's,
    so they do not change with what is installed."""
    if host is None:
        host = read_host_profile(SHIPPED_DIR / "host" / "ddr4-3200-2ch.toml")
    if device is None:
        # The default device sits on the host's side of the link: unified with a unified-memory
        # host (a free link, as `lane_costs` gives it), PCIe 4.0 x16 otherwise.
        device = dataclasses.replace(
            read_profile(SHIPPED_DIR / "rtx3060-12gb.toml"),
            h2d_bandwidth_bytes_per_s=PCIE4_X16_BYTES_PER_S,
            interconnect="unified memory" if host.unified_memory else "PCIe 4.0 x16",
        )
    return lane_costs(device, host)


# -- sizing -------------------------------------------------------------------------
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

    def for_dtype(self, experts_dtype: str) -> ModelSize:
        """The same model with its experts stored as `experts_dtype`: slots and fits use those bytes."""
        return dataclasses.replace(self, expert_bytes=self.expert_bytes_by_dtype[experts_dtype])

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

    from .compression import make_codec
    from .config import EXPERTS_DTYPES
    from .errors import UnsupportedModelError
    from .folders import default_dtype, read_config, resolve_path
    from .layout import find_moe_layers, spec_of
    from .native import expected_formats

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
    by_dtype = {d: make_codec(spec, d, native).nbytes for d in EXPERTS_DTYPES}
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
        top_k=max(layer.top_k for layer in layers),
        expert_bytes=by_dtype["auto"],  # as load stores them by default: native formats stay packed
        non_expert_bytes=int(non_expert),
        expert_bytes_by_dtype=by_dtype,
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


# -- calibration ------------------------------------------------------------------
def calibrate(device: str = "cuda", name: str | None = None, sizes_mib=CALIBRATION_SIZES_MIB) -> tuple[Profile, dict]:
    """Measure a CUDA device: pinned H2D bandwidth by copy size, device-to-device bandwidth,
    bf16 matmul rate and free memory. Returns the profile and the raw measurements."""
    import torch

    if not str(device).startswith("cuda"):
        raise DeviceError(f"calibrate needs a CUDA device, not {device!r}; pass --device cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError("calibrate needs a CUDA device; torch sees none on this machine")
    dev = torch.device(device)
    with torch.cuda.device(dev):
        free, total = torch.cuda.mem_get_info(dev)
        gpu = torch.cuda.get_device_name(dev)
        h2d = {mib: _h2d_rate(mib << 20, dev) for mib in sizes_mib}
        hbm = _d2d_rate(min(1 << 30, free // 4), dev)
        flops, matmul_dtype = _matmul_rate(dev)
    measured = {
        "device": gpu,
        "free_bytes": int(free),
        "total_bytes": int(total),
        "h2d_by_mib": h2d,
        "hbm_bytes_per_s": hbm,
        "bf16_flops": flops,
        "matmul_dtype": matmul_dtype,
    }
    return measured_profile(name or _slug(gpu, total), measured), measured


def measured_profile(name: str, m: dict) -> Profile:
    """Build a profile from `calibrate`'s measurements, citing each number as measured."""
    import torch

    when = time.strftime("%Y-%m-%d")
    tag = f"MEASURED by `moe-prefetch calibrate` on {when} ({m['device']}, torch {torch.__version__})"
    largest = max(m["h2d_by_mib"])
    by_size = ", ".join(f"{mib} MiB {rate / 1e9:.2f} GB/s" for mib, rate in sorted(m["h2d_by_mib"].items()))
    usable = round(m["free_bytes"] / m["total_bytes"] * CALIBRATION_HEADROOM, 3)
    return Profile(
        name=name,
        description=f"{m['device']} (calibrated {when})",
        device_memory_bytes=int(m["total_bytes"]),
        usable_fraction=usable,
        h2d_bandwidth_bytes_per_s=float(m["h2d_by_mib"][largest]),
        hbm_bandwidth_bytes_per_s=float(m["hbm_bytes_per_s"]),
        peak_bf16_flops=float(m["bf16_flops"]),
        interconnect="measured (see sources)",
        sources={
            "device_memory_bytes": f"{tag}: total from cudaMemGetInfo.",
            "usable_fraction": f"{tag}: free/total = {m['free_bytes']}/{m['total_bytes']} at calibration, "
            f"times {CALIBRATION_HEADROOM} for activations, KV cache and allocator slack.",
            "h2d_bandwidth_bytes_per_s": f"{tag}: pinned host->device copies by size: {by_size}; "
            f"the {largest} MiB rate is used.",
            "hbm_bandwidth_bytes_per_s": f"{tag}: device-to-device copy, read + write bytes per second "
            "(achieved, below the datasheet peak).",
            "peak_bf16_flops": f"{tag}: achieved dense {m.get('matmul_dtype', 'bfloat16')} matmul rate (4096^3), "
            "below the datasheet peak.",
        },
    )


def _slug(gpu: str, total: int) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "cuda"
    return f"{base}-{round(total / 2**30)}gb"


def _timed(dev: torch.device, fn, repeats: int) -> float:
    """Seconds per call of `fn`, timed with CUDA events after one warm-up call."""
    import torch

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _h2d_rate(nbytes: int, dev: torch.device) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # pinned: the copy engine DMAs from it
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    repeats = max(3, min(100, (1 << 30) // nbytes))
    return nbytes / _timed(dev, lambda: dst.copy_(src, non_blocking=True), repeats)


def _d2d_rate(nbytes: int, dev: torch.device) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * nbytes / _timed(dev, lambda: dst.copy_(src), 10)


def _matmul_rate(dev: torch.device, n: int = 4096) -> tuple[float, str]:
    import torch

    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # pre-Ampere: no bf16 units
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * math.pow(n, 3) / _timed(dev, lambda: a @ b, 10), str(dtype).removeprefix("torch.")
