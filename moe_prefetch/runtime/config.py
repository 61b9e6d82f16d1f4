"""Runtime settings: one frozen dataclass with every default, and size parsing."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields

from ..errors import ConfigError
from ..experts.dtypes import EXPERTS_DTYPES

PREDICTORS = ("none", "previous-token", "next-gate", "m2r2", "oracle")
DEVICES = ("auto", "cuda", "cpu")
CACHE_POLICIES = ("lru", "lfu", "lfru")  # eviction order: moe_prefetch.runtime.cache.make_policy
# predictor="m2r2" reads trained adapters: predictor_path, or this file in the checkpoint folder.
M2R2_FILENAME = "m2r2_adapters.safetensors"


def train_adapters_hint(out, model: str = "MODEL") -> str:
    """How to make the m2r2 adapters file `out`, the one hint every missing-adapters message gives."""
    return f"train them with `moe-prefetch train-predictor --model {model} --data FILE --out {out}`"


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, total: int | None = None, name: str = "size") -> int:
    """Turn 6442450944, "6GiB", "512MB" or "75%" (of `total`) into bytes. Messages name the
    value as `name=value` (e.g. name="cache_budget"), so they say which setting is wrong."""
    what = f"{name}={value!r}"
    if isinstance(value, bool):
        raise ConfigError(f"{what} is not a size; use bytes or a string such as '6GiB' or '75%'")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(f"{what} must be positive; use e.g. '6GiB'")
        return int(value)
    text = str(value).strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ConfigError(f"cannot parse {what}; use e.g. '75%' or '6GiB'") from None
        if not 0 < pct <= 100:
            raise ConfigError(f"{what}: a percentage must be in (0, 100]")
        if total is None:
            raise ConfigError(f"{what} is a percentage but the total is unknown; give bytes such as '6GiB'")
        return int(total * pct / 100)
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"cannot parse {what}; use bytes or a number with a unit: '6GiB', '512MB', '75%'")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what} must be positive; use e.g. '6GiB'")
    return size


@dataclass(frozen=True)
class RuntimeConfig:
    """Every runtime setting and its default, validated once.

    `cache_slots` is the total number of expert slots in the one device pool shared by all
    MoE layers; `cache_budget` (bytes or "6GiB"/"75%") is turned into slots; with neither
    the pool is sized from free device memory less the reserve for a run of `max_batch`
    sequences of `max_length` tokens (sizing.reserve) and less `safety_margin`.
    """

    device: str = "auto"
    cache_slots: int | None = None
    cache_budget: int | str | None = None
    predictor: str = "none"
    lookahead: int = 1
    predictor_path: str | None = None
    # Host profile (name or .toml path) for the placement cost model; None = profiles.default_lane_costs.
    # Checked where it is read (profiles.load_host_profile), which names the known host profiles.
    host_profile: str | None = None
    # Share of free device memory left untouched when sizing the pool automatically, after the
    # reserve for the KV cache, the prefill and cuBLAS (sizing.reserve): allocator fragmentation.
    safety_margin: float = 0.05
    # The longest sequence (prompt + generated tokens) and the most sequences at once the run
    # will hold: when the pool is sized from free memory, their KV cache and the prefill of the
    # whole prompt are left free first. None: the model's context, at most 4096 tokens.
    max_length: int | None = None
    max_batch: int = 1
    # Prompt tokens per forward in prefill (generate's `prefill_chunk_size`, set on the model's
    # generation config while attached): the prefill's activation peak is one chunk's, whatever
    # the prompt's length, and the reserve holds one chunk. None: the whole prompt at once.
    # `moe-prefetch run` and `serve` use sizing.PREFILL_CHUNK, the chunk `plan` sizes for.
    prefill_chunk: int | None = None
    # Extra predicted experts per layer beyond top_k that may be prefetched.
    prefetch_margin: int = 0
    # Test option: pace every copy to this many bytes/s (CPU loader only); None = unthrottled.
    link_bandwidth: float | None = None
    # Debug mode: after every layer check that each used slot holds the bytes it claims.
    verify_slots: bool = False
    # Keep every trace record, prediction and copy (reports, bench, simulate). Off, the runtime
    # keeps the latest few thousand of each, so a long-lived process holds steady memory.
    record: bool = False
    # Where a routed expert that is not resident runs: "wait" for its upload, on the "host"
    # CPU from the host store, or "auto": whichever the cost model says finishes first.
    on_miss: str = "auto"
    # How many trace records, predictions, copies and per-step stalls are kept when not recording.
    history: int = 4096
    # CPU threads for the host lane (torch intra-op threads) while attached to a CUDA device.
    # None: physical cores minus one, leaving a core for the thread that drives the GPU and the
    # loader's worker, so the host lane never oversubscribes the CPU. On a CPU device the
    # device lane is the CPU itself and torch's own setting is kept.
    host_threads: int | None = None
    # Which resident expert a miss evicts: least recently used, least frequently used (with
    # aging), or a recency-protected segment beside a frequency-ordered one (cache.py).
    cache_policy: str = "lru"
    # How experts are stored in host memory, moved over the link and held in device slots:
    # "auto" (the checkpoint's own format), "bf16", "fp16", "fp32", "int8" or "int4" (compression.py).
    experts_dtype: str = "auto"
    # On a CPU device, a one-row forward (batch 1 decode) of a bf16/fp16 model runs with oneDNN
    # off: torch's own gemv takes about half the CPU time of oneDNN's one-row matmul, for the
    # attention and head as well as the experts (model/decode_gemv.py). False: oneDNN as torch sets it.
    cpu_decode_gemv: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(self.device)):
            raise ConfigError(f"device={self.device!r} is not one of auto, cuda, cuda:N (N a GPU index) or cpu")
        if self.cache_slots is not None and self.cache_budget is not None:
            raise ConfigError("give cache_slots or cache_budget, not both")
        if self.cache_slots is not None and (not isinstance(self.cache_slots, int) or self.cache_slots < 1):
            raise ConfigError(f"cache_slots={self.cache_slots!r} must be a positive integer")
        if self.predictor not in PREDICTORS:
            raise ConfigError(f"unknown predictor {self.predictor!r}; choose one of {', '.join(PREDICTORS)}")
        if not isinstance(self.lookahead, int) or not 1 <= self.lookahead <= 8:
            raise ConfigError(f"lookahead={self.lookahead!r} must be an integer in 1..8")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ConfigError(f"max_length={self.max_length!r} must be a positive number of tokens (prompt + new)")
        if self.prefill_chunk is not None and (not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1):
            raise ConfigError(f"prefill_chunk={self.prefill_chunk!r} must be a positive number of tokens, or None")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ConfigError(f"max_batch={self.max_batch!r} must be a positive number of sequences")
        if not 0.0 <= self.safety_margin < 1.0:
            raise ConfigError(f"safety_margin={self.safety_margin!r} must be in [0, 1)")
        if self.prefetch_margin < 0:
            raise ConfigError(f"prefetch_margin={self.prefetch_margin!r} must be >= 0")
        if self.on_miss not in ("wait", "host", "auto"):
            raise ConfigError(f"on_miss={self.on_miss!r} is not one of wait, host, auto")
        if self.host_threads is not None and (not isinstance(self.host_threads, int) or self.host_threads < 1):
            raise ConfigError(f"host_threads={self.host_threads!r} must be a positive integer")
        if not isinstance(self.history, int) or self.history < 1:
            raise ConfigError(f"history={self.history!r} must be a positive integer (records kept per history)")
        if self.link_bandwidth is not None and self.link_bandwidth <= 0:
            raise ConfigError(f"link_bandwidth={self.link_bandwidth!r} must be positive bytes/s")
        if self.cache_policy not in CACHE_POLICIES:
            raise ConfigError(f"unknown cache_policy {self.cache_policy!r}; choose one of {', '.join(CACHE_POLICIES)}")
        if self.experts_dtype not in EXPERTS_DTYPES:
            raise ConfigError(
                f"experts_dtype={self.experts_dtype!r} is not one of {', '.join(EXPERTS_DTYPES)}; "
                "int4 and int8 compress the experts, auto keeps the checkpoint's format"
            )
        if not isinstance(self.cpu_decode_gemv, bool):
            raise ConfigError(f"cpu_decode_gemv={self.cpu_decode_gemv!r} must be True or False")
        if self.cache_budget is not None and not str(self.cache_budget).strip().endswith("%"):
            parse_size(self.cache_budget, name="cache_budget")  # fail early on an unparsable size


def config_for(caller: str, **options) -> RuntimeConfig:
    """`RuntimeConfig(**options)` for the public function `caller`: a misspelt keyword is a
    ConfigError naming `caller` and the closest setting, not a TypeError about the dataclass."""
    names = [f.name for f in fields(RuntimeConfig)]
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the settings are {', '.join(names)}"
            raise ConfigError(f"{caller}() got an unknown keyword {key!r}; {hint}")
    return RuntimeConfig(**options)
