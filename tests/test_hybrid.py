"""Hybrid placement: the cost model's choices, the simulator's host lane and the bench contract."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from moe_prefetch.cli.main import app
from moe_prefetch.runtime.placement import DEFAULT_COSTS, Placement, device_call_s

MIXTRAL_EXPERT_PARAMS = 3 * 4096 * 14336  # w1, w3, w2


def test_a_decode_token_on_a_cold_expert_runs_on_the_host_and_a_prefill_chunk_waits():
    placement = Placement(DEFAULT_COSTS, 2 * MIXTRAL_EXPERT_PARAMS, MIXTRAL_EXPERT_PARAMS, "auto")
    assert placement.host_s(1) < placement.link_s() + placement.device_s(1)
    assert placement.on_host(tokens=1, in_flight=False)
    assert not placement.on_host(tokens=512, in_flight=False), "FLOP-bound: the device wins after the copy"
    assert Placement(DEFAULT_COSTS, 1, 1, "wait").on_host(1, False) is False
    assert Placement(DEFAULT_COSTS, 1, 1, "host").on_host(10_000, False) is True


@pytest.mark.e2e
def test_bench_contract_rows_with_on_miss_and_the_host_lane(tmp_path):
    out = tmp_path / "hybrid.json"
    args = [
        "bench",
        *("--model", "shape:mixtral-8x7b", "--routing", "demo", "--on-miss", "wait,auto"),
        *("--predictors", "none,m2r2", "--cache-fractions", "0.25", "--profiles", "rtx3060-12gb"),
        *("--host", "ddr4-3200-2ch", "--tokens", "8", "--json", str(out)),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    placed = [r for r in rows if r["on_miss"] in ("wait", "auto") and r["predictor"] in ("none", "m2r2")]
    assert {(r["on_miss"], r["predictor"]) for r in placed} >= {("wait", "none"), ("auto", "m2r2")}
    for row in rows:
        assert {"on_miss", "predictor", "cache_fraction", "simulated"} <= set(row)
    speed = {(r["on_miss"], r["predictor"]): r["simulated"]["rtx3060-12gb"] for r in placed}
    # On a PCIe 3.0 card with a DDR4 host, a batch-1 miss is cheaper on the host than over the link.
    assert speed[("auto", "none")] > speed[("wait", "none")]
    auto_rows = [r for r in placed if r["on_miss"] == "auto"]
    assert all(r["simulated_host_experts_per_token"]["rtx3060-12gb"] > 0 for r in auto_rows)


def test_bench_refuses_an_unknown_placement():
    result = CliRunner().invoke(app, ["bench", "--model", "demo", "--on-miss", "sometimes"])
    assert result.exit_code == 2 and "on_miss" in result.output and "Traceback" not in result.output


def test_with_misses_on_the_host_a_prefetch_that_cannot_land_in_time_is_skipped():
    from moe_prefetch.runtime.cache import ExpertCache
    from moe_prefetch.runtime.placement import LaneCosts
    from moe_prefetch.runtime.scheduler import Scheduler

    class Link:  # records what would be copied
        def __init__(self):
            self.copies = []

        def submit(self, slot, src, dst, priority, tag=None):
            self.copies.append(tag)

        def done(self, slot):
            return False

        def left(self, slot):
            return 1.0

    costs = LaneCosts(1e9, 1e9, 1e12, 0.0, 1e12, 1e14)  # 1 GB/s link: a 10 MB expert takes 10 ms
    for on_miss, expected in (("auto", [(2, 5)]), ("wait", [(1, 3), (2, 5)])):
        cache = ExpertCache(8, 10_000_000, [0, 1, 2])
        link = Link()
        scheduler = Scheduler(cache, link, lambda key, slot: (None, None), [0, 1, 2], top_k=1)
        scheduler.placement = Placement(costs, 10_000_000, 5_000_000, on_miss)
        scheduler.new_step()
        for now in (0.0, 0.006, 0.012):  # layers take 6 ms
            scheduler.tick(now)
        # Layer 1 is one layer (6 ms) away: a 10 ms copy arrives late. Layer 2 is 12 ms away.
        scheduler.prefetch(0, [(1, 1, [3]), (2, 2, [5])])
        assert link.copies == expected, on_miss


def test_host_lane_threads_leave_a_core_on_cuda_and_follow_the_setting():
    import torch
    from tiny_models import make_model

    import moe_prefetch
    from moe_prefetch.model.integration import host_threads_for
    from moe_prefetch.runtime.config import RuntimeConfig

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert host_threads_for(RuntimeConfig(), cuda, 8) == 7, "physical cores minus one on CUDA"
    assert host_threads_for(RuntimeConfig(), cuda, 1) == 1
    assert host_threads_for(RuntimeConfig(), cpu, 8) is None, "a CPU device keeps torch's own setting"
    assert host_threads_for(RuntimeConfig(host_threads=3), cpu, 8) == 3
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1  # a change, whatever the test process runs with
    model = make_model("olmoe")
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4, host_threads=wanted)
    try:
        assert torch.get_num_threads() == wanted and runtime.stats()["host_threads"] == wanted
    finally:
        runtime.detach()
    assert torch.get_num_threads() == before, "detach restores the thread count"


def test_host_lane_runs_one_pass_per_layer_with_two_kernel_calls_per_expert():
    """Several experts on the host in one layer call cost one host-lane pass: two matmuls per
    host expert (up, down) and nothing for the layer's other experts (grouped_mm on a CPU pays a
    matmul per group, empty ones included)."""
    import torch
    from tiny_models import make_model, prompt

    import moe_prefetch
    from moe_prefetch.experts.host_kernels import KINDS

    model = make_model("qwen3_moe")
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=4, on_miss="host", record=True)
    try:
        with torch.no_grad():
            model(prompt(batch=2, length=6))
        calls = [r for r in runtime.trace if r["host"]]
        assert any(len(r["host"]) > 1 for r in calls)
        stats = runtime.stats()
        assert stats["host_passes"] == len(calls)
        experts = sum(len(r["host"]) for r in calls)
        assert stats["host_kernel_calls"] == {**dict.fromkeys(KINDS, 0), "dense": 2 * experts}
        assert stats["host_kernels"]["down_proj"].startswith("F.linear")
    finally:
        runtime.detach()


@pytest.mark.parametrize("on_miss", ["host", "wait"])
def test_measured_bench_hit_rate_counts_host_experts(monkeypatch, on_miss):
    """A measured bench row's decode hit rate is device hits over every routed expert of the
    decode steps, recomputed here from the trace the row was made from: experts that ran on the
    host are not hits (it read 100% when they were left out), and the prefill (step 0) is not
    decode (with misses waiting for copies, the decode steps hit and the prefill does not)."""
    from tiny_models import make_model, prompt

    from moe_prefetch.evidence import bench

    traces = []

    def replay_payload(runtime):
        payload = real(runtime)
        traces.append(payload["trace"])
        return payload

    real = bench.replay_payload
    monkeypatch.setattr(bench, "replay_payload", replay_payload)
    result = bench.run_bench(
        make_model("mixtral"), prompt(1, 6), ["none"], [0.25], tokens=6, device="cpu", on_miss=on_miss
    )
    row = next(r for r in result["rows"] if r["predictor"] == "none")
    (trace,) = traces
    decode = [r for r in trace if r["step"] >= 1]
    hits = sum(r["hits"] for r in decode)
    routed = sum(r["hits"] + r["misses"] + len(r["host"]) for r in decode)
    if on_miss == "host":
        assert sum(len(r["host"]) for r in decode) > 0
    else:
        assert hits > 0 and sum(r["misses"] for r in trace if r["step"] == 0) > 0
    assert row["decode_hit_rate"] == pytest.approx(hits / routed, rel=1e-9)


def test_on_a_cpu_device_auto_copies_small_experts_and_runs_large_ones_in_place():
    """On a CPU device both lanes are the same cores: the host lane saves a copy but splitting a
    layer costs a second kernel call. A small expert (the demo's 0.75 MB) is copied, a large
    one (a Mixtral expert's 704 MB in fp32) runs in place; several misses in one call share the
    split once it is paid."""
    import torch

    from moe_prefetch.runtime.runtime import CPU_SPLIT_CALL_S, default_costs

    costs = default_costs(torch.device("cpu"))
    assert costs.split_call_s == CPU_SPLIT_CALL_S > 0
    small = Placement(costs, 786_432, 196_608, "auto")
    assert not small.on_host(tokens=1, in_flight=False)
    assert small.on_host(tokens=1, in_flight=False, host_busy=small.host_s(1))  # the split is paid
    large = Placement(costs, 4 * MIXTRAL_EXPERT_PARAMS, MIXTRAL_EXPERT_PARAMS, "auto")
    assert large.on_host(tokens=1, in_flight=False)
    assert DEFAULT_COSTS.split_call_s == 0  # a GPU machine's lanes: the host lane runs beside the device


def test_in_prefill_an_expert_behind_queued_copies_runs_on_the_host():
    """What `auto` does in prefill (README, placement.py; issue 22 item 11): each expert is priced
    behind the copies already queued in its layer call, so a cold layer's first misses wait for
    their copies and the later ones, chosen by few tokens, run on the host; an expert that many
    tokens share still waits. The demo's expert (0.75 MB) on a CPU device, and a Mixtral expert
    on the default GPU costs."""
    import torch

    from moe_prefetch.runtime.runtime import default_costs

    demo = Placement(default_costs(torch.device("cpu")), 786_432, 196_608, "auto")
    assert not demo.on_host(tokens=3, in_flight=False, link_busy=2 * demo.link_s())
    assert demo.on_host(tokens=3, in_flight=False, link_busy=3 * demo.link_s())
    mixtral = Placement(DEFAULT_COSTS, 2 * MIXTRAL_EXPERT_PARAMS, MIXTRAL_EXPERT_PARAMS, "auto")
    assert mixtral.on_host(tokens=3, in_flight=False, link_busy=mixtral.link_s())
    assert not mixtral.on_host(tokens=512, in_flight=False, link_busy=mixtral.link_s())


@pytest.mark.parametrize(("predictor", "experts_dtype"), [("none", "auto"), ("next-gate", "auto"), ("none", "int4")])
def test_with_misses_on_the_host_a_cpu_device_copies_nothing(predictor, experts_dtype):
    """On a CPU device a use in a slot saves no host time (same cores, same memory): with
    on_miss="host" neither host-served experts nor predictions are copied into slots, since each
    copy only competes with the host lane for memory bandwidth (issue 19: ~280 MB per token)."""
    import torch
    from tiny_models import make_model, prompt

    import moe_prefetch

    model = make_model("qwen3_moe")
    runtime = moe_prefetch.attach(
        model, device="cpu", cache_slots=4, on_miss="host", predictor=predictor, experts_dtype=experts_dtype
    )
    try:
        with torch.no_grad():
            model.generate(prompt(1, 6), max_new_tokens=4, do_sample=False)
        stats = runtime.stats()
        assert stats["host_experts"] > 0
        assert stats["uploads"] == 0 and stats["bytes_loaded"] == 0 and stats["prefetch_issued"] == 0
    finally:
        runtime.detach()


def test_auto_sends_a_bf16_models_int4_decode_miss_to_the_host_where_it_wins():
    """int4 experts the host lane reads as stored (torch's CPU int4 layout) cost their stored
    bytes there, at the kernel's cost per byte, not a decode per use. On the shipped DDR4-3200
    desktop host behind a PCIe 3.0 link (12 GB/s), a decode token's cold Mixtral-sized int4
    expert now runs on the host; decoded first (as an fp32 model's still is) it cost ~8x more
    there and always waited for the link. Behind PCIe 4.0 the link still wins for int4."""
    import dataclasses

    import torch

    from moe_prefetch.experts import compression, host_kernels
    from moe_prefetch.experts.compression import make_codec
    from moe_prefetch.experts.layout import ExpertSpec
    from moe_prefetch.runtime.profiles import default_lane_costs

    if not compression.torch_int4_block():
        pytest.skip("torch's CPU int4 kernel packs differently here")

    class Experts:  # what the host lane's plan reads of an experts module
        has_gate, is_transposed = True, False

    pcie4 = default_lane_costs()
    pcie3 = dataclasses.replace(pcie4, link_bytes_per_s=12e9)
    shapes = ((2 * 14336, 4096), (4096, 14336))
    placements = {}
    for dtype in (torch.bfloat16, torch.float32):
        spec = ExpertSpec(names=("gate_up_proj", "down_proj"), shapes=shapes, dtype=dtype)
        codec = make_codec(spec, "int4")
        host_bytes = host_kernels.host_bytes(codec, Experts)
        for name, costs in (("pcie3", pcie3), ("pcie4", pcie4)):
            placements[dtype, name] = Placement(costs, codec.nbytes, spec.numel, "auto", host_bytes)
    packed, decoded = placements[torch.bfloat16, "pcie3"], placements[torch.float32, "pcie3"]
    assert packed.host_bytes < 2 * packed.expert_bytes and decoded.host_bytes > 8 * packed.host_bytes
    assert packed.on_host(tokens=1, in_flight=False)
    assert not decoded.on_host(tokens=1, in_flight=False)
    assert not placements[torch.bfloat16, "pcie4"].on_host(tokens=1, in_flight=False)


def test_the_share_of_a_copy_left_counts_only_for_a_copy_in_flight():
    mixtral = 3 * 4096 * 14336
    auto = Placement(DEFAULT_COSTS, 2 * mixtral, mixtral, "auto")
    assert auto.on_host(1, in_flight=False) and not auto.on_host(1, in_flight=True, left=0.05)
    assert auto.on_host(1, in_flight=False, left=0.05), "a copy not yet started: its whole link time"
    # left defaults to the whole copy: in flight or not, the same choice where the two lanes are close
    close = next(t for t in range(1, 4096) if not auto.on_host(t, in_flight=False))
    assert auto.on_host(close, in_flight=True) is False
    assert Placement(DEFAULT_COSTS, 2 * mixtral, mixtral, "wait").on_host(1, in_flight=False) is False


def test_a_host_pass_costs_the_split_call_and_the_lanes_fixed_cost():
    costs = dataclasses.replace(DEFAULT_COSTS, split_call_s=1e-3, host_layer_s=2e-3)
    assert Placement(costs, 100, 50).host_pass_s() == pytest.approx(3e-3)


def test_lane_times_are_the_bytes_or_the_flops_whichever_takes_longer():
    costs = dataclasses.replace(DEFAULT_COSTS, host_call_s=1e-5, host_bytes_per_s=1e9, host_flops=1e9)
    placement = Placement(costs, 1000, 10**6)  # the default placement decides by finish time
    assert placement.on_miss == "auto"
    assert placement.host_s(1) == pytest.approx(1e-5 + 2e-3) and placement.host_s(3) == pytest.approx(1e-5 + 6e-3)
    assert device_call_s(10, params=100, pairs=3, bytes_per_s=1.0, flops=1.0) == 600
    assert device_call_s(10, params=100, pairs=3, bytes_per_s=1.0, flops=1e9, experts=2) == 20
    with pytest.raises(ValueError, match="on_miss='sometimes'; choose one of wait, host, auto$"):
        Placement(costs, 1, 1, "sometimes")
