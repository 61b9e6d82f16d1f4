"""Calibration: how fast this machine's CPU computes an expert from host memory, and how fast a
CUDA device copies and computes.

`calibrate_host` times a SwiGLU expert (the shape of Mixtral's, or smaller) on the CPU with torch:
batch-1 calls, i.e. matrix-vector products as in decode, in weight bytes per second, beside a
plain large copy (what the DRAM gives), a many-token call (FLOP/s, as in a prefill chunk) and a
tiny call (the fixed cost per call). The result is a `runtime.profiles.HostProfile`, every number
cited as measured. `calibrate` measures a CUDA device the same way into a `runtime.profiles.Profile`:
pinned copy bandwidth by size, device-to-device bandwidth, matmul rate and free memory.

torch loads inside the functions that measure: listing and reading profiles must not pay for it.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, DeviceError
from ..runtime.profiles import HOST_DTYPES, HostProfile, Profile

if TYPE_CHECKING:
    import torch

CALIBRATION_SIZES_MIB = (1, 4, 16, 64, 256)
# Share of the free memory seen at calibration that a profile calls usable: the rest is for
# activations, KV cache and allocator slack, as vLLM's default --gpu-memory-utilization of 0.9.
CALIBRATION_HEADROOM = 0.90

# Expert shapes for `calibrate_host`, (hidden, intermediate) of a SwiGLU expert (gate, up, down):
# mixtral is Mixtral-8x7B's expert (352 MB in bf16); small fits in caches, a quick check only.
HOST_SIZES = {"small": (512, 1792), "medium": (2048, 7168), "mixtral": (4096, 14336)}
# Below this many weight bytes in play, the timed experts would sit in the last-level cache
# and the numbers would be the cache's, not the DRAM's: the timing cycles through copies.
HOST_POOL_BYTES = 512 << 20
HOST_FLOP_TOKENS = 128  # tokens of one prefill chunk on one expert, for the FLOP/s figure


def calibrate_host(
    size: str = "mixtral", dtype: str = "bfloat16", name: str | None = None, threads: int | None = None
) -> tuple[HostProfile, dict]:
    """Measure this machine's host lane with torch on the CPU: a batch-1 SwiGLU expert call
    (matrix-vector, as in decode) in weight bytes/s, against a plain large copy; FLOP/s with
    HOST_FLOP_TOKENS tokens on one expert; and the fixed cost of a call on a tiny expert.
    Runs on `threads` torch intra-op threads, by default what the host lane gets: physical cores
    minus one, left for the driver thread. Returns the host profile and the raw measurements."""
    import torch

    if size not in HOST_SIZES:
        raise ConfigError(f"unknown host size {size!r}; choose one of {', '.join(HOST_SIZES)}")
    if dtype not in HOST_DTYPES:
        raise ConfigError(f"host dtype {dtype!r} must be one of {', '.join(HOST_DTYPES)}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"host threads {threads!r} must be a positive integer")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, _physical_cores() - 1))
    try:
        measured = _measure(size, getattr(torch, dtype))
    finally:
        torch.set_num_threads(before)
    return measured_host_profile(name or _host_slug(measured), measured), measured


def _measure(size: str, dt) -> dict:
    import torch

    hidden, inter = HOST_SIZES[size]
    gen = torch.Generator().manual_seed(0)
    first = _host_expert(hidden, inter, dt, gen)
    expert_bytes = sum(w.numel() * w.element_size() for w in first)
    # Other experts run between two calls of one expert in decode, so its weights are never warm.
    copies = 1 if size == "small" else -(-HOST_POOL_BYTES // expert_bytes)
    pool = itertools.cycle([first] + [tuple(w.clone() for w in first) for _ in range(1, copies)])
    x = torch.randn(1, hidden, generator=gen).to(dt)
    call_s = _host_timed(lambda: _swiglu(x, *next(pool)), budget_s=1.0)
    batch = torch.randn(HOST_FLOP_TOKENS, hidden, generator=gen).to(dt)
    flop_s = _host_timed(lambda: _swiglu(batch, *first), budget_s=1.0, repeats=3)
    pool = None  # free the copies before the copy test allocates
    formats = _packed_rates(first, x, copies) if dt == torch.bfloat16 else {}
    src = torch.empty(max(expert_bytes, 1 << 20), dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    copy_s = _host_timed(lambda: dst.copy_(src), budget_s=0.5)
    tiny = _host_expert(64, 128, dt, gen)
    tiny_x = torch.randn(1, 64, generator=gen).to(dt)
    overhead_s = _host_timed(lambda: _swiglu(tiny_x, *tiny), budget_s=0.3, repeats=200)
    unified = bool(torch.cuda.is_available() and torch.cuda.get_device_properties(0).is_integrated)
    import psutil

    return {
        "memory_bytes": int(psutil.virtual_memory().total),
        **cpu_lane(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "physical_cores": _physical_cores(),
        "size": size,
        "dtype": str(dt).removeprefix("torch."),
        "expert_shape": [hidden, inter],
        "expert_bytes": expert_bytes,
        "expert_call_s": call_s,
        "expert_bytes_per_s": expert_bytes / call_s,
        "copy_bytes": src.numel(),
        "copy_bytes_per_s": 2 * src.numel() / copy_s,  # read + write, as STREAM counts a copy
        "flop_tokens": HOST_FLOP_TOKENS,
        "host_flops": 2 * 3 * hidden * inter * HOST_FLOP_TOKENS / flop_s,
        "call_overhead_s": overhead_s,
        "unified_memory": unified,
        # the host lane's packed kernels on the same expert, in stored bytes per second
        # (host_kernels.py): the placement charges a format its stored bytes at expert_bytes_per_s
        "format_bytes_per_s": {"bfloat16": expert_bytes / call_s, **formats},
    }


def measured_host_profile(name: str, m: dict) -> HostProfile:
    """Build a host profile from `calibrate_host`'s measurements, citing each number as measured."""
    import torch

    when = time.strftime("%Y-%m-%d")
    tag = (
        f"MEASURED by `moe-prefetch calibrate` on {when} ({m['cpu']}, {m['threads']} torch threads, "
        f"torch {torch.__version__}, {m['size']} expert {m['expert_shape'][0]}x{m['expert_shape'][1]} {m['dtype']})"
    )
    peak = max(m["copy_bytes_per_s"], m["expert_bytes_per_s"])
    return HostProfile(
        name=name,
        description=f"{m['cpu']} (calibrated {when})",
        physical_cores=int(m["physical_cores"]),
        dram_peak_bytes_per_s=float(peak),
        dram_bandwidth_bytes_per_s=float(m["copy_bytes_per_s"]),
        expert_bytes_per_s=float(m["expert_bytes_per_s"]),
        host_flops=float(m["host_flops"]),
        expert_call_overhead_s=float(m["call_overhead_s"]),
        memory_bytes=int(m["memory_bytes"]),
        pinnable_fraction=PINNABLE_FRACTION,
        framework_layer_s=float(m["framework_layer_s"]),
        runtime_layer_s=float(m["runtime_layer_s"]),
        framework_token_s=float(m["framework_token_s"]),
        compute_dtype=m["dtype"],
        unified_memory=bool(m["unified_memory"]),
        sources={
            "physical_cores": f"{tag}: psutil.cpu_count(logical=False).",
            "dram_peak_bytes_per_s": f"{tag}: NOT the theoretical peak, which software cannot read portably; the "
            "highest rate measured (a lower bound). Replace with channels x 8 bytes x MT/s from the board's manual.",
            "dram_bandwidth_bytes_per_s": f"{tag}: copy of {m['copy_bytes'] / 2**20:.0f} MiB, read + write bytes "
            "per second (STREAM's convention for a copy).",
            "expert_bytes_per_s": f"{tag}: one batch-1 SwiGLU expert call as the host lane runs it (2 matrix-vector "
            "products, gate_up then down), weight bytes "
            f"/ median call time ({m['expert_call_s'] * 1e3:.2f} ms for {m['expert_bytes'] / 1e6:.1f} MB), cycling "
            "through copies of the expert so its weights come from DRAM, not cache. The host lane's packed kernels on "
            "the same expert, stored bytes/s: "
            + (", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in m.get("format_bytes_per_s", {}).items()) or "-"),
            "host_flops": f"{tag}: the same expert on {m['flop_tokens']} tokens at once, 6 x hidden x intermediate "
            f"x tokens FLOPs / median time, in {m['dtype']}.",
            "expert_call_overhead_s": f"{tag}: median time of a batch-1 call of a 64x128 expert, whose bytes take "
            "no measurable time: op dispatch and thread wake-up.",
            "unified_memory": f"{tag}: torch.cuda device 0 is_integrated (false when there is no CUDA device).",
            "memory_bytes": f"{tag}: psutil.virtual_memory().total.",
            "pinnable_fraction": f"NOT MEASURED: {PINNABLE_FRACTION}, the desktop estimate of the shipped host "
            "profiles (the OS and other programs keep the rest); lower it on a machine that runs much else.",
            "framework_layer_s": f"{tag}: stock transformers' eager decode of a tiny {CPU_LANE_SHAPE} model on "
            f"{m['lane_device']} ({m['lane_layers']} layers), a bare forward loop, per token per decoder layer: the "
            "host time of a layer when its arithmetic costs nothing.",
            "runtime_layer_s": f"{tag}: the same model with the runtime attached and every expert resident, the time "
            "it adds per token per MoE layer (routing read, scheduler, bookkeeping).",
            "framework_token_s": f"{tag}: generate() against the bare forward loop on the same model, per token.",
        },
    )


def cpu_lane(device: str | None = None, tokens: int = 48) -> dict:
    """The CPU side of a decode token on this machine: a tiny Qwen3-MoE-shaped model (arithmetic
    that costs nothing), decoded at batch 1 on `device` (CUDA when there is one: kernel launches
    count; else the CPU). Per decoder layer: stock transformers' eager forward; per MoE layer: what
    the runtime adds with every expert resident; per token: generate's loop beyond the forwards."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.integration import attach

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.for_model("qwen3_moe", **CPU_LANE_CONFIG)
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    attached = copy.deepcopy(stock)
    ids = torch.tensor([[1, 2, 3, 4]], device=device)
    runtime = attach(attached, device=device, cache_slots=config.num_hidden_layers * config.num_experts)
    # Alternating rounds, medians: on a shared machine the load changes between measurements.
    loops, runs, generated = [], [], []
    try:
        for _ in range(CPU_LANE_ROUNDS):
            loops.append(_decode_s(stock, ids, tokens))
            runs.append(_decode_s(attached, ids, tokens))
            generated.append(_generate_s(stock, ids, tokens))
    finally:
        runtime.detach()
    stock_loop, attached_loop, generate = (statistics.median(x) for x in (loops, runs, generated))
    layers = config.num_hidden_layers
    return {
        "lane_device": device,
        "lane_layers": layers,
        "framework_layer_s": stock_loop / layers,
        # a floor of 1 us: a difference below the noise is not a free runtime
        "runtime_layer_s": max(1e-6, (attached_loop - stock_loop) / layers),
        "framework_token_s": max(1e-6, generate - stock_loop),
    }


CPU_LANE_ROUNDS = 5
# The tiny model `cpu_lane` times: Qwen3-MoE's layer structure (128 experts, top-8) with tiny matrices.
CPU_LANE_SHAPE = "Qwen3-MoE-shaped (128 experts, top-8, hidden 64)"
CPU_LANE_CONFIG = dict(
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_experts=128,
    num_experts_per_tok=8,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=512,
)
# Share of installed memory a calibrated host profile lets the store pin (the shipped desktops' estimate).
PINNABLE_FRACTION = 0.75


def _decode_s(model, ids, tokens: int) -> float:
    """Median seconds per token of a bare greedy forward loop with a KV cache (after a warm-up)."""
    import torch

    def one_pass() -> list[float]:
        times = []
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(tokens):
                start = time.perf_counter()
                out = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                nxt.cpu()  # the token is read back, as generate does
                times.append(time.perf_counter() - start)
        return times

    one_pass()
    times = sorted(one_pass())
    return times[len(times) // 2]


def _generate_s(model, ids, tokens: int) -> float:
    """Seconds per new token of generate(), prefill excluded (a one-token run is subtracted)."""
    mask = ids.new_ones(ids.shape)

    def timed(new: int) -> float:
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return time.perf_counter() - start

    timed(2)  # warm-up
    return (timed(tokens + 1) - timed(1)) / tokens


def _host_expert(hidden: int, inter: int, dtype, gen) -> tuple:
    import torch

    # As transformers stores a SwiGLU expert: gate_up [2 x intermediate, hidden], down [hidden, intermediate].
    shapes = ((2 * inter, hidden), (hidden, inter))
    return tuple((torch.randn(*s, generator=gen) / hidden**0.5).to(dtype) for s in shapes)


def _swiglu(x, gate_up, down):
    """One expert as the host lane runs it (runtime/host_lane.py): two matmuls on the stored
    weights, torch's own gemv for half precision (oneDNN off, as the lane sets it)."""
    import torch
    import torch.nn.functional as F

    was = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(x.dtype == torch.float32 and was)
    try:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, down)
    finally:
        torch._C._set_mkldnn_enabled(was)


# The stored formats the host lane runs on their own bytes (experts/host_kernels.py), beside bf16.
HOST_FORMATS = ("int8", "int4", "mxfp4", "fp8")
FP8_BLOCK = (128, 128)  # DeepSeek-V3's and Qwen3-FP8's weight_block_size


def format_calls(expert: tuple, x, copies: int, formats=HOST_FORMATS) -> dict[str, tuple[int, object]]:
    """`{format: (stored bytes per expert, call)}`: `call()` runs the next of `copies` stored copies
    of `expert` (bf16 `(gate_up, down)`) as the host lane runs it, up then down, on its stored
    bytes. A format this torch or shape has no kernel for is left out (the lane decodes it, which
    the placement charges apart). MXFP4 is stored as GPT-OSS stores it (`[in, out]` parameters,
    transposed experts); FP8 in blocks of `FP8_BLOCK`."""
    import torch

    from ..experts.compression import Codec, make_codec
    from ..experts.host_kernels import Projection, kind_of
    from ..experts.layout import ExpertSpec
    from ..experts.native import MXFP4, FP8Block

    names = ("gate_up_proj", "down_proj")
    calls = {}
    for fmt in formats:
        transposed = fmt == "mxfp4"
        weights = tuple(w.t().contiguous() for w in expert) if transposed else expert
        spec = ExpertSpec(names=names, shapes=tuple(tuple(w.shape) for w in weights), dtype=x.dtype)
        if fmt in ("mxfp4", "fp8"):
            one = MXFP4() if fmt == "mxfp4" else FP8Block(FP8_BLOCK)
            codec = Codec(spec, fmt, dict.fromkeys(names, one))
        else:
            codec = make_codec(spec, fmt)
        encoded = codec.encode(dict(zip(names, weights)))
        row = torch.empty(codec.stored.numel, dtype=torch.uint8)
        for name, view in codec.stored.views(row).items():
            view.copy_(encoded[name])
        rows = [row] + [row.clone() for _ in range(1, copies)]
        module = type("Experts", (), {"has_gate": True, "is_transposed": transposed})()
        kinds = {name: kind_of(codec, name, module) for name in names}
        if set(kinds.values()) != {fmt}:
            continue
        up, down = (Projection(codec, name, fmt, transposed) for name in names)
        projs = dict(zip(names, (up, down)))
        pool = itertools.cycle([{n: projs[n].prepare(p) for n, p in codec.typed(r).items()} for r in rows])

        def call(pool=pool, up=up, down=down):
            parts = next(pool)
            gate, value = up(x, parts["gate_up_proj"]).chunk(2, dim=-1)
            return down(torch.nn.functional.silu(gate) * value, parts["down_proj"])

        calls[fmt] = (codec.nbytes, call)
    return calls


def _packed_rates(expert: tuple, x, copies: int) -> dict[str, float]:
    """Stored bytes per second of the host lane's kernel for each stored format on `expert`
    (bf16), each cycling through `copies` encoded copies so the bytes come from DRAM; oneDNN off,
    as in a one-row decode step (model/decode_gemv.py)."""
    import torch

    was = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return {
            fmt: nbytes / _host_timed(call, budget_s=0.5)
            for fmt, (nbytes, call) in format_calls(expert, x, copies).items()
        }
    finally:
        torch._C._set_mkldnn_enabled(was)


def _host_timed(fn, budget_s: float, repeats: int = 50) -> float:
    """Median seconds per call of `fn` after one warm-up, over up to `repeats` calls within about `budget_s`."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _host_slug(m: dict) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", m["cpu"].lower()).strip("-")[:40].strip("-") or "host"
    return f"{base}-{m['physical_cores']}c"


# -- the device ---------------------------------------------------------------------
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
