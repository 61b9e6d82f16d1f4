"""The host lane's compiled int8 / int4 kernels (experts/cpu_kernels.c) against torch's packed
kernels and an fp64 reference, the one switch between them, and the host lane running them."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from tiny_models import make_model, prompt, sized_config

import moe_prefetch
from moe_prefetch.experts import cpu_kernels
from moe_prefetch.experts.compression import Int4, Int8, compress_experts, torch_int4_block

HAVE_CC = cpu_kernels._compiler() is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: torch's kernels run (the fallback tests still do)")
INT4_BLOCK = torch_int4_block()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A cache folder of the test's own and no loaded library, before and after (so a test that
    breaks the build leaves the next one the real kernels)."""
    monkeypatch.setenv("MOE_PREFETCH_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu_kernels.DISABLE_ENV, raising=False)
    cpu_kernels._load.cache_clear()
    yield tmp_path
    cpu_kernels._load.cache_clear()


@pytest.fixture(scope="module")
def lib():
    st = cpu_kernels.status()
    if not HAVE_CC:
        pytest.skip("no C compiler")
    assert st.available, st.reason  # a compiler and no kernel: a build or self-check failure to look at
    return st


def _int8_parts(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = Int8().encode(torch.randn(n, k, generator=g) * 0.02)
    return q["q"], q["scale"]


def _fp64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().T


# torch's int8 kernel reads K in steps of 16 (other K crash it: K % 16 == 0 here); rows odd or not of 4
@needs_cc
@pytest.mark.parametrize("n,k", [(1024, 1024), (1024, 512), (13, 160), (7, 48), (5, 16)])
@pytest.mark.parametrize("m", [1, 3])
def test_int8_matches_torchs_kernel(lib, m, n, k):
    """Same arithmetic as torch._weight_int8pack_mm (given its bf16 scales): fp32 sums in another
    order, so within one bf16 rounding step of the output."""
    q, scale = _int8_parts(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    scale_bf16 = scale.reshape(-1).bfloat16()
    expected = torch._weight_int8pack_mm(x, q, scale_bf16)
    got = cpu_kernels.int8_mm(x, q, scale_bf16.float())
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-6)
    # in fp32 both ways the difference is summation order only
    exact = _fp64(x.float(), q.float() * scale_bf16.float().unsqueeze(-1))
    got32 = cpu_kernels.int8_mm(x.float(), q, scale_bf16.float())
    torch.testing.assert_close(got32.double(), exact, rtol=1e-5, atol=1e-6)


@needs_cc
@pytest.mark.parametrize("n,k", [(1, 1), (3, 15), (7, 17), (5, 77), (19, 1000), (4, 8200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 9])
def test_int8_tails_odd_rows_and_dtypes_against_fp64(lib, m, n, k, dtype):
    """K not a multiple of 16 or 64 (masked tails), rows not a multiple of 4 or of the 8-row
    blocks, activation rows one (decode), a few, and past a group of four (prefill), a long K
    (the activations in heap memory), each activation dtype: the stored fp32 scales, fp32 sums,
    one rounding into the input's dtype."""
    q, scale = _int8_parts(n, k, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(dtype)
    got = cpu_kernels.int8_mm(x, q, scale)
    exact = _fp64(x, q.float() * scale)
    assert got.dtype == dtype
    eps = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(got.double(), exact, rtol=eps, atol=1e-5 * exact.abs().max().item())


@needs_cc
@pytest.mark.skipif(not INT4_BLOCK, reason="torch's CPU int4 kernel packs differently here")
@pytest.mark.parametrize("n,k,group", [(1024, 1024, 64), (1024, 512, 64), (128, 192, 32), (64, 256, 128)])
@pytest.mark.parametrize("m", [1, 2, 9])  # 9 rows of 1024: the activations in heap memory
def test_int4_matches_torchs_kernel(lib, m, n, k, group):
    """The stored block layout decoded in C gives torch._weight_int4pack_mm_for_cpu's values:
    per group s * sum(x (q - 8)) + z * sum(x) against its per-weight (q - 8) * s + z, fp32 both."""
    fmt = Int4(group, INT4_BLOCK, torch.bfloat16)
    parts = fmt.encode(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).bfloat16()
    expected = torch._weight_int4pack_mm_for_cpu(x, parts["q"], group, parts["sz"])
    got = cpu_kernels.int4_mm(x, parts["q"], group, parts["sz"], INT4_BLOCK)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-3)
    w = torch.empty(n, k)
    fmt.decode(parts, w)  # the decode path's fp32 weights: the same values
    got32 = cpu_kernels.int4_mm(x.float(), parts["q"], group, parts["sz"], INT4_BLOCK)
    exact = _fp64(x.float(), w)
    torch.testing.assert_close(got32.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


@needs_cc
@pytest.mark.parametrize("block", [32, 16])
def test_int4_other_blocks_take_the_portable_path(lib, block):
    """Blocks other than 64 (AVX2 machines pack 32) run the portable C: same values as decoding."""
    n, k, group = 3 * block, 128, 32
    fmt = Int4(group, block, torch.bfloat16)
    parts = fmt.encode(torch.randn(n, k, generator=torch.Generator().manual_seed(block)))
    w = torch.empty(n, k)
    fmt.decode(parts, w)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, k, generator=torch.Generator().manual_seed(3)).to(dtype)
        exact = _fp64(x, w)
        got = cpu_kernels.int4_mm(x.float(), parts["q"], group, parts["sz"], block)  # fp32 out: no rounding
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
        got = cpu_kernels.int4_mm(x, parts["q"], group, parts["sz"], block)
        torch.testing.assert_close(got.double(), exact, rtol=2**-7, atol=1e-5 * exact.abs().max().item())


@needs_cc
def test_rows_split_over_threads_compute_the_same(lib):
    """With the lane's threads above one, rows are split over OpenMP threads (at least 256 KiB of
    weights each): the same values as one thread, each row being one thread's own sum."""
    q, scale = _int8_parts(1024, 1024)
    fmt = Int4(64, INT4_BLOCK or 64, torch.bfloat16)
    parts = fmt.encode(torch.randn(1024, 1024, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(6)).bfloat16()
    was = torch.get_num_threads()
    one = cpu_kernels.int8_mm(x, q, scale), cpu_kernels.int4_mm(x, parts["q"], 64, parts["sz"], fmt.block)
    try:
        torch.set_num_threads(2)
        two = cpu_kernels.int8_mm(x, q, scale), cpu_kernels.int4_mm(x, parts["q"], 64, parts["sz"], fmt.block)
    finally:
        torch.set_num_threads(was)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_cc
def test_portable_build_computes_the_same(fresh, monkeypatch):
    """The portable C (what a machine without AVX-512 builds; forced here by -DMP_GENERIC) names
    itself "generic" and computes the same, tails included."""
    monkeypatch.setattr(cpu_kernels, "_FLAG_SETS", (("-O3", "-march=native", "-DMP_GENERIC"),))
    st = cpu_kernels.status()
    assert st.available and st.isa == "generic", st.reason
    assert cpu_kernels.name("int8") == "int8-c-generic"
    q, scale = _int8_parts(5, 77)
    x = torch.randn(1, 77)
    exact = _fp64(x, q.float() * scale)
    torch.testing.assert_close(cpu_kernels.int8_mm(x, q, scale).double(), exact, rtol=1e-5, atol=1e-6)


@needs_cc
def test_built_once_per_source_and_reused(fresh, monkeypatch):
    """One file per (source, compiler, flags, CPU) key in the cache folder; a new process (here: a
    cleared cache) loads it without compiling again."""
    st = cpu_kernels.status()
    assert st.available and st.path.startswith(str(fresh)), st
    files = sorted(p.name for p in fresh.rglob("*.so"))
    assert len(files) == 1
    cpu_kernels._load.cache_clear()
    monkeypatch.setattr(cpu_kernels, "_build", lambda *a: pytest.fail("rebuilt a cached kernel"))
    assert cpu_kernels.status().path == st.path


def test_disabled_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    st = cpu_kernels.status()
    assert not st.available and cpu_kernels.DISABLE_ENV in st.reason
    assert cpu_kernels.projection("int8", Int8()) is None and cpu_kernels.name("int8") is None
    assert not list(fresh.rglob("*.so"))  # nothing built


@pytest.mark.parametrize(
    "breakage,reason",
    [
        ("no compiler", "no C compiler"),
        ("compiler fails", "build failed"),
        ("self-check fails", "self-check failed"),
    ],
)
def test_falls_back_to_torch_with_the_reason(fresh, monkeypatch, breakage, reason):
    if breakage == "no compiler":
        monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    elif breakage == "compiler fails":
        monkeypatch.setenv("CC", "false")  # exits 1 for `--version` output and every build
    else:
        if not HAVE_CC:
            pytest.skip("no C compiler")
        monkeypatch.setattr(cpu_kernels, "_self_check", lambda lib: "int8 made up")
    st = cpu_kernels.status()
    assert not st.available and st.reason.startswith(reason), st.reason
    assert cpu_kernels.projection("int8", Int8()) is None


def test_nothing_is_built_at_import(tmp_path):
    code = "import moe_prefetch, moe_prefetch.experts.host_kernels, moe_prefetch.runtime.host_lane"
    env = {"MOE_PREFETCH_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert not list(tmp_path.rglob("*"))


def test_a_bf16_host_lane_builds_nothing(fresh):
    """Stats of a lane without int8 or int4 parameters say so, and nothing is compiled for them."""
    model = make_model("mixtral").to(torch.bfloat16)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=3, on_miss="host")
    try:
        with torch.no_grad():
            model(prompt(batch=1, length=3))
        assert runtime.stats()["host_kernels_reason"] == "no int8 or int4 parameters"
    finally:
        runtime.detach()
    assert not list(fresh.rglob("*.so")) and cpu_kernels._load.cache_info().currsize == 0


def _host_lane_run(arch: str, experts_dtype: str, sizes: dict | None = None):
    """Logits and stats of a bf16 model whose experts all run on the host lane, and its reference
    (the same compressed experts decoded, all resident)."""
    config = sized_config(arch, **sizes) if sizes else None
    stock = make_model(arch, config=config).to(torch.bfloat16)
    reference = compress_experts(copy.deepcopy(stock), experts_dtype)
    model = copy.deepcopy(stock)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=3, experts_dtype=experts_dtype, on_miss="host")
    try:
        ids = prompt(batch=2, length=7)
        with torch.no_grad():
            got, expected = model(ids).logits.float(), reference(ids).logits.float()
            one = model(ids[:1, :1]).logits.float()  # one token: the one-row (decode) path
            one_ref = reference(ids[:1, :1]).logits.float()
        return got, expected, one, one_ref, runtime.stats()
    finally:
        runtime.detach()


@needs_cc
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_host_lane_runs_the_compiled_int8_kernel(lib, arch, monkeypatch):
    """With the kernel the host lane's logits stay within bf16 rounding of the reference (the
    tolerance of test_host_lane_reads_int8_as_stored_in_half_precision), stats name it, and
    MOE_PREFETCH_NO_CKERNEL=1 gives torch's kernel, named, with the reason."""
    got, expected, one, one_ref, stats = _host_lane_run(arch, "int8")
    torch.testing.assert_close(got, expected, atol=4e-3, rtol=1e-2)
    torch.testing.assert_close(one, one_ref, atol=4e-3, rtol=1e-2)
    assert stats["host_kernel_calls"]["int8"] > 0
    assert set(stats["host_kernels"].values()) == {f"int8-c-{lib.isa}"}, stats["host_kernels"]
    assert "self-check passed" in stats["host_kernels_reason"]
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    got_t, _, one_t, _, stats_t = _host_lane_run(arch, "int8")
    assert all(v.startswith("torch._weight_int8pack_mm") for v in stats_t["host_kernels"].values())
    assert cpu_kernels.DISABLE_ENV in stats_t["host_kernels_reason"]
    torch.testing.assert_close(got, got_t, atol=4e-3, rtol=1e-2)  # the two kernels agree
    torch.testing.assert_close(one, one_t, atol=4e-3, rtol=1e-2)


@needs_cc
@pytest.mark.skipif(not INT4_BLOCK, reason="torch's CPU int4 kernel packs differently here")
@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_host_lane_runs_the_compiled_int4_kernel(lib, arch):
    sizes = {"hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 64}
    got, expected, one, one_ref, stats = _host_lane_run(arch, "int4", sizes)
    torch.testing.assert_close(got, expected, atol=4e-3, rtol=1e-2)
    torch.testing.assert_close(one, one_ref, atol=4e-3, rtol=1e-2)
    assert stats["host_kernel_calls"]["int4"] > 0 and stats["host_kernel_calls"]["decode"] == 0
    assert set(stats["host_kernels"].values()) == {f"int4-c-{lib.isa}"}, stats["host_kernels"]


@needs_cc
def test_placement_charges_the_kernel_that_runs(lib, monkeypatch):
    """The host lane's cost of an int8 expert (placement, simulator) is the compiled kernel's
    where it runs and torch's packed kernel's where it does not."""
    from moe_prefetch.experts import host_kernels
    from moe_prefetch.experts.compression import make_codec
    from moe_prefetch.experts.layout import ExpertSpec

    spec = ExpertSpec(names=("gate_up_proj", "down_proj"), shapes=((128, 64), (64, 64)), dtype=torch.bfloat16)
    codec = make_codec(spec, "int8")

    class Experts:
        has_gate, is_transposed = True, False

    compiled = host_kernels.host_bytes(codec, Experts)
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    packed = host_kernels.host_bytes(codec, Experts)
    assert compiled == round(codec.nbytes * host_kernels.COMPILED_BYTE_COST["int8"])
    assert packed == round(codec.nbytes * host_kernels.KERNEL_BYTE_COST["int8"]) > compiled
