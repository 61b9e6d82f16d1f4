"""What fits where: a model's device and host memory on named hardware, and the cache it leaves.

    free device memory = usable memory (profile: memory x usable_fraction)
                         - non-expert weights (real vocabulary and tying, the model's dtype)
                         - KV cache for the stated context (`context`, the model's KV geometry)
                         - the pool's working buffer (a layer's top_k experts decoded, and their
                           stored rows when compressed) and the decode's scratch
                         - the activation peak of one prefill chunk (PREFILL_CHUNK tokens)
    cache slots          = free // bytes per expert as stored (the largest that fits: `cache="fit"`),
                           or a stated share of that
    host memory          = every expert as stored, once (the host store), against the host's
                           memory x pinnable_fraction (on unified memory, less what the device part takes)

A configuration fits when its slots are at least top_k, no more than the free device memory holds,
and its store fits the host. Every simulated figure this project prints or documents comes from a
configuration that fits (`Fit.fits`); a cache stated as a share of bf16 experts' memory
(`cache_fraction`) is a what-if and says whether it fits. Torch-free: the anatomy carries the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..runtime import sizing

DEFAULT_CONTEXT = 4096
# Tokens of one prefill chunk: `moe-prefetch run` and `serve` feed a longer prompt in chunks of
# this size (RuntimeConfig.prefill_chunk), so the peak does not grow with the prompt.
PREFILL_CHUNK = sizing.PREFILL_CHUNK
# The decode's reused scratch per device when experts are compressed (compression._scratch): an
# fp32 buffer and a uint8 one of at most this many values each (`compression._DECODE_ELEMS`), or
# of one expert's values when fewer.
DECODE_SCRATCH_VALUES = 1 << 24
# What `--cache` takes: "fit" (the largest cache that fits) or a share of it.
CACHE_FIT = "fit"


@dataclass(frozen=True)
class Fit:
    """One model with one experts_dtype on one device (and host), at one context."""

    profile: str
    host: str | None
    experts_dtype: str
    context: int
    usable_bytes: int
    weights_bytes: int  # non-expert weights
    kv_bytes: int
    work_bytes: int  # the pool's working buffer and the decode scratch
    prefill_bytes: int  # activation peak of one prefill chunk
    free_bytes: int  # what is left for expert slots (may be negative)
    slot_bytes: int
    max_slots: int  # the largest cache that fits (capped at every expert)
    cache_slots: int  # the cache this configuration uses
    total_experts: int
    top_k: int
    host_bytes: int  # the host store: every expert as stored
    host_capacity: int | None  # pinnable host memory left for the store; None: no host named
    what_if: bool  # the cache was stated as a share of bf16 experts' memory, not sized to the device

    @property
    def device_bytes(self) -> int:
        """Device memory this configuration takes: the reserved parts and its slots."""
        reserved = self.weights_bytes + self.kv_bytes + self.work_bytes + self.prefill_bytes
        return reserved + self.cache_slots * self.slot_bytes

    @property
    def fits_device(self) -> bool:
        return self.top_k <= self.cache_slots <= self.max_slots

    @property
    def fits_host(self) -> bool:
        return self.host_capacity is None or self.host_bytes <= self.host_capacity

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host

    @property
    def all_resident(self) -> bool:
        return self.cache_slots >= self.total_experts

    @property
    def why_not(self) -> str | None:
        """One line on what does not fit, or None."""
        gib = 2**30
        if self.max_slots < self.top_k:
            return (
                f"{self.profile}: weights {self.weights_bytes / gib:.2f} + KV {self.kv_bytes / gib:.2f} (context "
                f"{self.context}) + working {self.work_bytes / gib:.2f} + prefill {self.prefill_bytes / gib:.2f} GiB "
                f"leave {max(0, self.free_bytes) / gib:.2f} of {self.usable_bytes / gib:.2f} GiB usable: room for "
                f"{self.max_slots} {self.experts_dtype} experts, top_k is {self.top_k}"
            )
        if self.cache_slots > self.max_slots:
            return (
                f"{self.profile}: {self.cache_slots} {self.experts_dtype} slots need "
                f"{self.cache_slots * self.slot_bytes / gib:.2f} GiB; {max(0, self.free_bytes) / gib:.2f} GiB are free "
                f"after weights, KV and buffers ({self.max_slots} slots)"
            )
        if not self.fits_host:
            return (
                f"host {self.host}: the {self.experts_dtype} expert store is {self.host_bytes / gib:.1f} GiB; "
                f"{self.host_capacity / gib:.1f} GiB of host memory can be pinned"
            )
        return None

    def as_dict(self) -> dict:
        return {
            "profile": self.profile,
            "host": self.host,
            "experts_dtype": self.experts_dtype,
            "context": self.context,
            "fits": self.fits,
            "fits_device": self.fits_device,
            "fits_host": self.fits_host,
            "what_if": self.what_if,
            "cache_slots": self.cache_slots,
            "max_slots": self.max_slots,
            "total_experts": self.total_experts,
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "host_capacity": self.host_capacity,
            "usable_bytes": self.usable_bytes,
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "work_bytes": self.work_bytes,
            "prefill_bytes": self.prefill_bytes,
            "free_bytes": self.free_bytes,
            "slot_bytes": self.slot_bytes,
            "why_not": self.why_not,
        }


def work_bytes(anatomy, experts_dtype: str) -> int:
    """The pool's working buffer (`integration.resolve_slots`: top_k experts in the model's dtype,
    plus their stored rows when compressed) and, when compressed, the decode's scratch."""
    plain = anatomy.expert_params * anatomy.itemsize
    stored = anatomy.expert_bytes(experts_dtype)
    compressed = stored != plain
    scratch = min(DECODE_SCRATCH_VALUES, anatomy.expert_params) * (4 + 1) if compressed else 0
    return anatomy.top_k * (plain + (stored if compressed else 0)) + scratch


def prefill_bytes(anatomy, context: int) -> int:
    """Activation peak of one prefill chunk: its tokens' widest layer activations, plus the last
    token's logits in fp32 (generate keeps only the last position's)."""
    tokens = min(context, PREFILL_CHUNK)
    return tokens * anatomy.prefill_values_per_token * anatomy.itemsize + 2 * 4 * anatomy.vocab_size


def host_capacity(host, host_memory: int | None = None) -> int | None:
    """Host bytes the store may pin: `host_memory` (an override) or the host profile's memory,
    times its pinnable share. None when neither is given."""
    if host_memory is not None:
        share = host.pinnable_fraction if host is not None else 1.0
        return int(host_memory * share)
    if host is None:
        return None
    return int(host.memory_bytes * host.pinnable_fraction)


def fit(
    anatomy,
    experts_dtype: str,
    profile,
    host=None,
    context: int = DEFAULT_CONTEXT,
    cache: str | float = CACHE_FIT,
    cache_fraction: float | None = None,
    cache_slots: int | None = None,
    host_memory: int | None = None,
) -> Fit:
    """Size `anatomy` with experts stored as `experts_dtype` on device `profile` (and `host`).

    The cache: `cache_slots` if given; else `cache_fraction` (a what-if: that share of the memory
    bf16 experts would take, as bench's old default); else `cache`: "fit" (the largest that fits)
    or a share in (0, 1] of it (at least top_k)."""
    if context < 1:
        raise ConfigError(f"--context {context} must be at least 1 token")
    if anatomy.max_positions:
        context = min(context, int(anatomy.max_positions))  # the model cannot hold a longer one
    usable = int(profile.usable_bytes)
    weights = anatomy.non_expert_bytes
    kv = anatomy.kv_bytes(context)
    work = work_bytes(anatomy, experts_dtype)
    prefill = prefill_bytes(anatomy, context)
    free = usable - weights - kv - work - prefill
    slot = anatomy.expert_bytes(experts_dtype)
    total = anatomy.total_experts
    max_slots = max(0, min(total, free // slot)) if free > 0 else 0
    what_if = False
    if cache_slots is not None:
        slots = int(cache_slots)
    elif cache_fraction is not None:
        bf16 = anatomy.expert_bytes("bf16")
        slots = max(anatomy.top_k, min(total, round(cache_fraction * total * bf16 / slot)))
        what_if = True
    else:
        slots = max_slots if cache == CACHE_FIT else max(anatomy.top_k, int(float(cache) * max_slots))
    capacity = host_capacity(host, host_memory)
    if capacity is not None and host is not None and host.unified_memory:
        # one memory: the device part comes out of the same DRAM as the store
        capacity -= weights + kv + work + prefill + slots * slot
    return Fit(
        profile=profile.name,
        host=None if host is None else host.name,
        experts_dtype=experts_dtype,
        context=context,
        usable_bytes=usable,
        weights_bytes=weights,
        kv_bytes=kv,
        work_bytes=work,
        prefill_bytes=prefill,
        free_bytes=free,
        slot_bytes=slot,
        max_slots=max_slots,
        cache_slots=slots,
        total_experts=total,
        top_k=anatomy.top_k,
        host_bytes=total * slot,
        host_capacity=capacity,
        what_if=what_if,
    )


def parse_cache(value: str | None) -> str | float:
    """`--cache`: "fit" or a share in (0, 1] of the largest cache that fits."""
    if value is None or value == CACHE_FIT:
        return CACHE_FIT
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise ConfigError(f"--cache {value!r} must be 'fit' or a share in (0, 1] of the largest cache that fits")
    return share


def stores_that_fit(anatomy, host, host_memory: int | None = None, dtypes=("bf16", "int8", "int4")) -> list[str]:
    """The experts_dtypes whose host store fits the host (all when no host is named)."""
    capacity = host_capacity(host, host_memory)
    if capacity is None:
        return list(dtypes)
    return [d for d in dtypes if anatomy.total_experts * anatomy.expert_bytes(d) <= capacity]


def parse_bytes(value: str | None) -> int | None:
    """`--host-memory`: '64GB', '64GiB', '32G' or a byte count."""
    if value is None:
        return None
    text = value.strip().upper().replace(" ", "")
    units = {"GIB": 2**30, "GB": 10**9, "G": 2**30, "MIB": 2**20, "MB": 10**6, "TIB": 2**40, "TB": 10**12, "B": 1}
    unit = next((u for u in units if text.endswith(u)), "")
    try:
        result = int(float(text[: len(text) - len(unit)]) * units.get(unit, 1))
    except ValueError:
        result = 0
    if result <= 0:
        raise ConfigError(f"--host-memory {value!r} must be a size such as 32GB, 64GiB or a byte count")
    return result
