"""The host lane's compiled int8 and int4 matmuls (cpu_kernels.c): built on first use, checked
against a plain torch reference, else torch's packed kernels run, with the reason recorded.

    first use   cc -O3 -march=native -shared -fPIC [-fopenmp] cpu_kernels.c -> per-user cache
                folder, one file per (source, compiler, flags, CPU) hash; later processes load it
    load        ctypes; a self-check multiplies tiny int8 and int4 matrices against torch's own
                arithmetic (tails, odd rows, bf16 and fp32) before any kernel is handed out
    fallback    no compiler, a failed build or check, or MOE_PREFETCH_NO_CKERNEL=1: `status()`
                says why (logged at debug), `host_kernels` keeps torch's packed kernels

Why a kernel of our own: torch's int8 kernel widens and multiplies every weight in fp32 and runs
compute-bound, at half of bf16's gemv rate per stored byte (7.1 against 15.4 GB/s per expert on
one Zen 4 core; this kernel 11.7: docs/benchmarks.md, section 8). Nothing is built at import time
or into the checkout. Threads: the kernels split rows over `torch.get_num_threads()`, the lane's
`host_threads`, through torch's own OpenMP pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
DISABLE_ENV = "MOE_PREFETCH_NO_CKERNEL"
# Tried in turn: -fopenmp splits a matmul's rows over the lane's threads (a compiler without it
# still builds one-threaded). -march=native is required: it enables the AVX-512 path, and the
# portable C vectorised for the machine (AVX2: 9.0 GB/s on cold 1 MiB int8 matrices, one core)
# still beats torch's kernel (7.6), but built for baseline x86-64 (SSE2) it fell to 5.3, so there
# torch's runs.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native"),
)
_BUILD_TIMEOUT_S = 120
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the C file's MP_F32, MP_BF16
_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


@dataclass(frozen=True)
class Status:
    """What `host_kernels` runs: the compiled library (None: torch's kernels) and why."""

    lib: ctypes.CDLL | None
    isa: str  # "avx512" or "generic" (the C file's paths), "" without a library
    reason: str
    path: str = ""

    @property
    def available(self) -> bool:
        return self.lib is not None


def status() -> Status:
    """The compiled kernels, built and checked once per process (the disabling variable is read
    on every call, so a test or a user can switch back to torch's kernels)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return Status(None, "", f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}")
    return _load()


def name(kind: str) -> str | None:
    """The compiled kernel's name for a host-lane kind ("int8-c-avx512"), or None for torch's."""
    st = status()
    return f"{kind}-c-{st.isa}" if st.available and kind in ("int8", "int4") else None


def projection(kind: str, fmt) -> Callable | None:
    """The compiled matmul `(x [M, K], stored parts) -> [M, N]` for a host-lane projection of
    `kind` ("int8", or "int4" in torch's block layout) stored as `fmt`, or None where torch's
    kernel runs (no library: `status().reason` says why). Bound once per projection, so a call
    costs the ctypes call and the output's allocation, nothing looked up."""
    lib = status().lib
    if lib is None:
        return None
    if kind == "int8":
        return functools.partial(_int8, lib.mp_int8_mm)
    if kind == "int4" and getattr(fmt, "block", 0):
        return functools.partial(_int4, lib.mp_int4_mm, fmt.group, fmt.block)
    return None


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x [M, K] @ (q [N, K] * scale [N])^T` in fp32 sums, in `x`'s dtype (bf16, fp16 or fp32):
    torch._weight_int8pack_mm's arithmetic, with the stored fp32 scales. Needs `status().available`."""
    return projection("int8", None)(x, {"q": q, "scale": scale})


def int4_mm(x: torch.Tensor, q: torch.Tensor, group: int, sz: torch.Tensor, block: int) -> torch.Tensor:
    """`x [M, K]` times the int4 weight `q` stored in torch's CPU block layout (`block` rows per
    block, `compression.Int4`) with bf16 scales and zeros `sz [K / group, N, 2]`: the arithmetic of
    torch._weight_int4pack_mm_for_cpu, in `x`'s dtype. Needs `status().available`."""
    fmt = type("Layout", (), {"group": group, "block": block})
    return projection("int4", fmt)(x, {"q": q, "sz": sz})


def _int8(fn, x: torch.Tensor, parts) -> torch.Tensor:
    q, scale = parts["q"], parts["scale"]
    if scale.dtype != torch.float32:
        scale = scale.float()
    xc, dtype = _activation(x)
    (m, k), n = xc.shape, q.shape[0]
    out = torch.empty((m, n), dtype=dtype)
    code = _DTYPES[dtype]
    rc = fn(xc.data_ptr(), code, m, k, _dense(q).data_ptr(), _dense(scale).data_ptr(), n, out.data_ptr(), code,
            torch.get_num_threads())  # fmt: skip
    if rc:
        raise MemoryError(f"cpu_kernels: no memory for {m} x {k} activations in fp32")
    return out if dtype == x.dtype else out.to(x.dtype)


def _int4(fn, group: int, block: int, x: torch.Tensor, parts) -> torch.Tensor:
    q, sz = parts["q"], parts["sz"]
    xc, dtype = _activation(x)
    (m, k), n = xc.shape, sz.shape[1]
    out = torch.empty((m, n), dtype=dtype)
    code = _DTYPES[dtype]
    rc = fn(xc.data_ptr(), code, m, k, _dense(q).data_ptr(), _dense(sz).data_ptr(), n, group, block,
            out.data_ptr(), code, torch.get_num_threads())  # fmt: skip
    if rc:
        raise ValueError(f"cpu_kernels: int4 {n} x {k} in blocks of {block}, groups of {group} not taken (rc {rc})")
    return out if dtype == x.dtype else out.to(x.dtype)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """`x` as the C file reads it (bf16 or fp32, contiguous) and the dtype it writes: fp16 goes
    through fp32 both ways (a K-value conversion; the result is rounded once, as torch's is)."""
    if x.dtype not in _DTYPES:
        x = x.float()
    return _dense(x), x.dtype


# ---------------------------------------------------------------- build and load


def cache_dir() -> Path:
    """Where built kernels live: `kernels/` under $MOE_PREFETCH_CACHE, else under $XDG_CACHE_HOME
    or ~/.cache, `moe-prefetch/kernels/` (beside the quantized copies, model/quantized_copy.py)."""
    root = os.environ.get("MOE_PREFETCH_CACHE")
    if root:
        return Path(root) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe-prefetch" / "kernels"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return shutil.which(cc) if cc else None


def _cpu_signature() -> str:
    """What -march=native depends on: the processor's model and feature flags."""
    info = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features", "CPU part")):
                info.append(line)
                if len(info) >= 3:
                    break
    except OSError:
        pass
    return "\n".join(info) or platform.processor() or platform.machine()


@functools.cache
def _load() -> Status:
    cc = _compiler()
    if cc is None:
        return _fallback("no C compiler found (set CC or install gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return _fallback(f"{cc} --version failed: {e}")
    try:
        source = SOURCE.read_bytes()
    except OSError as e:
        return _fallback(f"kernel source missing from the package: {e}")
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join(x.encode() for x in (cc, version, " ".join(flags), _cpu_signature()))
                             + b"\0" + source).hexdigest()[:16]  # fmt: skip
        path = cache_dir() / f"cpu_kernels-{key}.so"
        if not path.exists():
            error = _build(cc, flags, path)
            if error:
                errors.append(f"{' '.join(flags)}: {error}")
                continue
        try:
            lib = _bind(ctypes.CDLL(str(path)))
        except OSError as e:
            errors.append(f"{' '.join(flags)}: load failed: {e}")
            continue
        isa = lib.mp_isa().decode()
        try:
            failed = _self_check(lib)
        except Exception as e:  # noqa: BLE001 - any failure of the check means torch's kernels
            failed = f"{type(e).__name__}: {e}"
        if failed:
            return _fallback(f"self-check failed ({failed}) for {path}")
        threads = "OpenMP threads" if lib.mp_openmp() else "one thread"
        reason = f"built with {Path(cc).name} {' '.join(flags)}: {isa} path, {threads}, self-check passed"
        log.debug("cpu_kernels: %s (%s)", reason, path)
        return Status(lib, isa, reason, str(path))
    return _fallback("build failed: " + "; ".join(errors))


def _fallback(reason: str) -> Status:
    log.debug("cpu_kernels: torch's kernels run: %s", reason)
    return Status(None, "", reason)


def _build(cc: str, flags: tuple[str, ...], path: Path) -> str | None:
    """Compile into `path` (atomically: another process may build the same key), or say why not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
    except OSError as e:
        return f"cache folder {path.parent} not writable: {e}"
    try:
        cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if run.returncode:
            return (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1][:200]
        os.replace(tmp, path)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)[:200]
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.mp_isa.restype, lib.mp_isa.argtypes = ctypes.c_char_p, []
    lib.mp_openmp.restype, lib.mp_openmp.argtypes = _INT, []
    lib.mp_int8_mm.restype = _INT
    lib.mp_int8_mm.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _PTR, _I64, _PTR, _INT, _INT]
    lib.mp_int4_mm.restype = _INT
    lib.mp_int4_mm.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _PTR, _I64, _I64, _INT, _PTR, _INT, _INT]
    return lib


def _self_check(lib: ctypes.CDLL) -> str:
    """Tiny matmuls against torch's fp64 arithmetic on the same stored values: "" or what failed.
    Shapes cover K tails (not a multiple of 16), a row count not a multiple of 4, two activation rows."""
    g = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 7, 37), (2, 12, 80)):
        x = torch.randn(m, k, generator=g)
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) + 0.5
        for dtype in _DTYPES:
            xd = x.to(dtype)
            out = torch.empty(m, n, dtype=dtype)
            lib.mp_int8_mm(xd.data_ptr(), _DTYPES[dtype], m, k, q.data_ptr(), scale.data_ptr(), n,
                           out.data_ptr(), _DTYPES[dtype], 1)  # fmt: skip
            expect = (xd.double() @ (q.double() * scale.double().unsqueeze(-1)).T).to(dtype).double()
            if not torch.allclose(out.double(), expect, rtol=1e-2, atol=1e-2 * expect.abs().max().item()):
                return f"int8 {m}x{k} @ {n}x{k} in {dtype}"
    from .compression import Int4

    for block in (64, 32):
        n, k, group = 2 * block, 64, 32
        fmt = Int4(group, block, torch.bfloat16)
        parts = fmt.encode(torch.randn(n, k, generator=g))
        w = torch.empty(n, k)
        fmt.decode(parts, w)
        for dtype in _DTYPES:  # bf16 activations take the pair dot-product path where there is one
            x = torch.randn(1, k, generator=g).to(dtype)
            out = torch.empty(1, n)
            rc = lib.mp_int4_mm(x.data_ptr(), _DTYPES[dtype], 1, k, parts["q"].data_ptr(), parts["sz"].data_ptr(),
                                n, group, block, out.data_ptr(), 0, 1)  # fmt: skip
            ref = x.double() @ w.double().T
            if rc or not torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()):
                return f"int4 {n}x{k} in blocks of {block}, {dtype}"
    return ""
