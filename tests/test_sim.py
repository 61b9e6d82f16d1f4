"""The simulator agrees with measurement: a CPU run whose copies are paced to a set link
bandwidth, replayed through the same scheduler on a virtual link of that bandwidth; with host
execution, its host lane timed at what one expert on the host costs on this machine."""

import os
import statistics

import pytest
import torch
from tiny_models import paced_mixtral

import moe_prefetch
from moe_prefetch.evidence.sim import Clock, CpuLane, SimLoader, simulate
from moe_prefetch.runtime.loader import DEMAND
from moe_prefetch.runtime.placement import LaneCosts, Placement

FREE = float("inf")  # a lane cost that does not count


def paced_run(
    predictor: str,
    bandwidth: float,
    tokens: int = 24,
    on_miss: str = "wait",
    costs: LaneCosts | None = None,
    cache_slots: int = 12,
    intermediate_size: int = 256,
):
    cpu = measure_cpu_lane()
    model = paced_mixtral(intermediate_size)
    runtime = moe_prefetch.attach(
        model,
        device="cpu",
        cache_slots=cache_slots,
        predictor=predictor,
        lookahead=2,
        link_bandwidth=bandwidth,
        on_miss=on_miss,
        record=True,
    )
    if costs is not None:
        # Decide with this machine's lanes: a CPU device's default costs know nothing of the pace.
        runtime.placement = Placement(costs, runtime.spec.nbytes, runtime.spec.numel, on_miss)
        runtime.scheduler.placement = runtime.placement
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    starts = runtime.step_starts
    measured = (len(starts) - 2) / (starts[-1] - starts[1])  # decode steps 1..n-1, fully bracketed
    result = dict(
        trace=list(runtime.trace),
        predictions=list(runtime.predictions),
        step_starts=list(starts),
        expert_bytes=runtime.spec.nbytes,
        expert_params=runtime.spec.numel,
        loads=list(runtime.loader.events),
        stats=runtime.stats(),
        cpu=cpu,
    )
    runtime.detach()
    return measured, result


def measure_cpu_lane() -> CpuLane:
    """This machine's CPU lane for the paced model, as `calibrate` measures one: the stock decode
    of the same layer structure (4 layers, 8 experts, top-2) with tiny matrices, per token per
    layer: the framework's host time when the arithmetic costs nothing. Measured right before
    each paced run, so both see the same load on this shared machine."""
    import time

    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=256,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    times = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=9, min_new_tokens=9)
            one = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1)
            times.append((one - start - (time.perf_counter() - one)) / 8)
    return CpuLane(layer_s=min(times) / config.num_hidden_layers)  # the least loaded of three


def _quiet_machine():
    """These checks time a paced run on this CPU against the simulator: on a machine whose other
    work keeps every core busy, the measured side slows and the ratio says nothing about the model."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 1.5 * cores:
        pytest.skip(f"machine busy (load average {load:.1f} on {cores} cores): the 15% timing check needs it quiet")


@pytest.mark.parametrize("predictor", ["none", "next-gate"])
def test_simulated_tokens_per_second_within_15_percent(predictor):
    _quiet_machine()
    bandwidth = 80e6  # 80 MB/s: each 262 kB expert takes ~3.3 ms, so stalls dominate
    measured, run = paced_run(predictor, bandwidth)
    sim = simulate(
        run["trace"],
        cache_slots=12,
        expert_bytes=run["expert_bytes"],
        bandwidth=bandwidth,
        moe_layer_ids=[0, 1, 2, 3],
        num_layers=4,
        predictions=run["predictions"],
        step_starts=run["step_starts"],
        predictor="recorded",
        lookahead=2,
        cpu=run["cpu"],  # the CPU lane included: no layer faster than the framework's host time here
    )
    assert run["stats"]["misses"] > 0 and sim["stall_share"] > 0.1, "the link must matter in this check"
    ratio = sim["tokens_per_s"] / measured
    print(f"{predictor}: measured {measured:.1f} tok/s, simulated {sim['tokens_per_s']:.1f} tok/s, ratio {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15


def host_expert_s(trace: list[dict]) -> float:
    """What one expert cost on the host lane of this machine in this run: the runtime times its
    host part; decode calls' host seconds over the experts they ran on the host."""
    calls = [r for r in trace if r["host"] and r["step"] > 0]
    return sum(r["host_s"] for r in calls) / sum(len(r["host"]) for r in calls)


def link_bytes_per_s(loads: list[dict]) -> float:
    """The paced link as it ran: the median copy's bytes over its duration (sleeps overshoot)."""
    return statistics.median(e["bytes"] / (e["end"] - e["start"]) for e in loads)


def lane_costs(bandwidth: float, host_s: float) -> LaneCosts:
    """The paced link, and a host lane of `host_s` per expert (a decode call is overhead-bound)."""
    return LaneCosts(bandwidth, FREE, FREE, host_s, FREE, FREE)


def simulated_hybrid(run: dict, link: float, on_miss: str, host_s: float, cpu: CpuLane | None = None) -> dict:
    """`run` replayed with the runtime's placement rule on a link of `link` bytes/s and a host
    lane of `host_s` per expert, its device part as measured."""
    placement = Placement(lane_costs(link, host_s), run["expert_bytes"], run["expert_params"], on_miss)
    return simulate(
        run["trace"],
        cache_slots=HYBRID_SLOTS,
        expert_bytes=run["expert_bytes"],
        bandwidth=link,
        moe_layer_ids=[0, 1, 2, 3],
        num_layers=4,
        predictions=run["predictions"],
        step_starts=run["step_starts"],
        predictor="recorded",
        lookahead=2,
        placement=placement,
        host_overlaps=False,  # the device is this CPU: its host lane runs after the device part
        cpu=cpu,
    )


HYBRID_SLOTS = 8  # of 32 experts: most misses go to the host lane
HYBRID_WIDTH = 2048  # experts of 2 MB in fp32: the one-pass host lane must weigh in the token


@pytest.fixture(scope="module")
def host_lane_run():
    """A paced run where every miss runs on the host and is then uploaded to keep a hot set: its
    lanes say a use on the device saves host time (as on a GPU machine), so uploads are
    investments. (With a CPU device's own lanes nothing would be copied: no copy could pay.)"""
    bandwidth = 80e6
    return paced_run("none", bandwidth, 32, "host", lane_costs(bandwidth, 1e-4), HYBRID_SLOTS, HYBRID_WIDTH)


@pytest.mark.parametrize("on_miss", ["host", "auto"])
def test_simulated_hybrid_tokens_per_second_within_15_percent(on_miss, host_lane_run):
    _quiet_machine()
    measured, run = host_lane_run
    host_s = host_expert_s(run["trace"])  # this machine's host lane, as the host-lane run timed it
    if on_miss == "auto":
        # A link where a copy takes 1.3 host experts (nearer 1.5 as the sleeps pace it): the first
        # miss of a decode call runs on the host and a second one waits for its copy, so the host
        # lane, the link and the device all lie on the critical path.
        bandwidth = run["expert_bytes"] / (1.3 * host_s)
        costs = lane_costs(bandwidth, host_s)
        measured, run = paced_run("next-gate", bandwidth, 32, "auto", costs, HYBRID_SLOTS, HYBRID_WIDTH)
    stats, link = run["stats"], link_bytes_per_s(run["loads"])
    sim = simulated_hybrid(run, link, on_miss, host_s, run["cpu"])
    lanes_only = simulated_hybrid(run, link, on_miss, host_s)  # what the run's lanes do, before the CPU floor
    assert stats["host_experts"] > 0 and stats["prefetch_used"] > 0, "misses on the host, uploads then hit"
    # With auto at most one of a layer's two misses runs on the host (the other waits) and the
    # one-pass lane is cheap, so its share of the token is smaller (3-8% measured, 2 MB experts).
    share = lanes_only["host_s_per_token"] * lanes_only["tokens_per_s"]
    assert share > (0.1 if on_miss == "host" else 0.02), "the host lane must matter in this check"
    if on_miss == "auto":
        assert stats["misses"] > 0 and lanes_only["stall_share"] > 0.01, "and some misses wait on the link"
    ratio = sim["tokens_per_s"] / measured
    # The check can fail: a host lane ten times too cheap (host), or both lanes ten times too slow
    # (auto: the placement moves misses from a slow lane to the other, so one alone hardly shows),
    # moves the simulated speed out of the band (without the CPU lane, whose floor would otherwise
    # hide what the lanes' error does).
    wrong_s, wrong_link = (host_s / 10, link) if on_miss == "host" else (host_s * 10, link / 10)
    wrong = simulated_hybrid(run, wrong_link, on_miss, wrong_s)["tokens_per_s"] / measured
    print(
        f"{on_miss}: measured {measured:.1f} tok/s ({stats['host_experts']} host experts, {stats['misses']} waited), "
        f"simulated {sim['tokens_per_s']:.1f} tok/s ({sim['host_experts']} host experts, {sim['stall_share']:.0%} "
        f"stalled), ratio {ratio:.3f}; host {1e3 * host_s:.3f} ms/expert, link {link / 1e6:.0f} MB/s; "
        f"at {wrong_s / host_s:g}x that host cost and {wrong_link / link:g}x the link, ratio {wrong:.3f}"
    )
    assert 0.85 <= ratio <= 1.15
    assert not 0.85 <= wrong <= 1.15


def test_sim_loader_orders_demand_first():
    clock = Clock()
    loader = SimLoader(3, clock, bandwidth=1.0, expert_bytes=1)  # 1 s per copy
    loader.submit(0, None, None, 2.0)  # the link is free: this one starts at once
    loader.submit(1, None, None, 1.0)
    loader.submit(2, None, None, DEMAND)
    loader.wait(2, layer_idx=0)  # after the copy in flight, the demand copy goes before slot 1
    assert clock.now == pytest.approx(2.0)
    assert loader.cancel(1) and not loader.cancel(0)  # slot 1 never reached the link
    assert loader.done(0) and loader.done(2)
    assert loader.take_stalls()[0] == pytest.approx(2.0)
    assert [e["slot"] for e in loader.events] == [0, 2]
