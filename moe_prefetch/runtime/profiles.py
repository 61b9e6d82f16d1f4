"""Hardware profiles: what a device can hold and how fast experts reach it.

A profile is one TOML file (schema in moe_prefetch/runtime/hardware_profiles/README.md). They are
found, first match by name wins, in: the folders named in $MOE_PREFETCH_PROFILES
(os.pathsep-separated), the user folder ($XDG_CONFIG_HOME or ~/.config)/moe-prefetch/profiles,
then the hardware_profiles/ folder shipped beside this module. Host profiles (the CPU and DRAM
that compute experts missing from the device) live in a `host/` subfolder of each, searched in the
same order, and are chosen separately from the device; `lane_costs` combines one of each for the
placement cost model. They sit in runtime/ because `attach` prices the placement's lanes with
the host profile it is given. What fits on a profile is `evidence.plan`; measuring a device or
host into a new profile is `evidence.calibration`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .placement import HOST_LAYER_S, LaneCosts

# No torch here: listing and reading profiles (`moe-prefetch profiles`, `--help`) must not pay
# seconds for it.

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


# The name that means "the profile `calibrate` measured on this machine".
LOCAL = "local"


def _newest_measured(folder: Path, what: str) -> Path:
    """The newest profile in `folder` whose sources say it was measured (`calibrate` writes them)."""
    found = [p for p in (sorted(folder.glob("*.toml")) if folder.is_dir() else []) if "MEASURED by" in p.read_text()]
    if not found:
        raise ConfigError(
            f"no {what} profile measured on this machine in {folder}; run `moe-prefetch calibrate` first, "
            "or name a shipped one (`moe-prefetch profiles`)"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def load_profile(name: str) -> Profile:
    """A profile by name (searched in `profile_dirs`), by path to a .toml file, or 'local': the
    newest one `calibrate` measured on this machine."""
    if name == LOCAL:
        return read_profile(_newest_measured(user_dir(), "device"))
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
    "memory_bytes",
    "pinnable_fraction",
    "framework_layer_s",
    "runtime_layer_s",
    "framework_token_s",
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
    memory_bytes: int  # installed DRAM
    pinnable_fraction: float  # share of it the host store may pin (the OS and other programs keep the rest)
    # The CPU side of a decode token, the fourth lane: the host time of one decoder layer of stock
    # transformers' eager forward at batch 1 (Python and kernel launches), the runtime's own per
    # MoE layer (routing read, scheduler, placement), and the generate loop's per token.
    framework_layer_s: float
    runtime_layer_s: float
    framework_token_s: float
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
        if not isinstance(self.memory_bytes, int):
            raise ConfigError(f"host profile {self.name!r}{where}: memory_bytes must be an integer byte count")
        if not 0 < self.pinnable_fraction <= 1:
            raise ConfigError(
                f"host profile {self.name!r}{where}: pinnable_fraction = {self.pinnable_fraction} must be in (0, 1]"
            )
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
            f"host profile {path} lacks {', '.join(missing)}; see hardware_profiles/README.md for the schema "
            "(a profile from an older `moe-prefetch calibrate`: run it again)"
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
    """A host profile by name (searched in `host_profile_dirs`), by path to a .toml file, or
    'local': the newest one `calibrate` measured on this machine."""
    if name == LOCAL:
        return read_host_profile(_newest_measured(user_dir() / "host", "host"))
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
    lines.append(f"memory_bytes = {host.memory_bytes}")
    lines += [
        f"{k} = {float(getattr(host, k)):.6g}".replace("e+", "e") for k in HOST_NUMBERS[1:] if k != "memory_bytes"
    ]
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
        host_layer_s=HOST_LAYER_S,
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
