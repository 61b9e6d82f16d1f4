"""The simulator's three-lane bound, its chunked link, and the bench/simulate flags that show them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moe_prefetch.cli.main import app
from moe_prefetch.evidence.bounds import three_lane_bound
from moe_prefetch.evidence.routing import random_routing
from moe_prefetch.evidence.sim import Clock, Roofline, SimLoader, simulate
from moe_prefetch.runtime.placement import LaneCosts, Placement

# 10 MB experts: 10 ms to read on the device (1 GB/s), 5 ms on the host (2 GB/s), 10 ms over the link.
ROOF = Roofline(hbm_bandwidth=1e9, peak_flops=1e15, dense_bytes_per_layer=1e6, expert_bytes=10**7, expert_params=5e6)
LANES = Placement(LaneCosts(1e9, 2e9, 1e12, 0.0, 1e9, 1e15), 10**7, 5 * 10**6, "auto")


def test_the_bound_splits_each_tokens_misses_between_host_and_link():
    # One layer: 1 ms dense. Token 1 routes 2 experts, both missing: both on the host (10 ms) beats
    # one each way (max(1 + 10, 5, 10) = 11 ms) and both over the link (max(21, 0, 20) = 21 ms).
    # Token 2 routes 2 resident experts: the device reads both, 1 + 2 x 10 = 21 ms.
    assert three_lane_bound([(2, [1.0, 1.0]), (2, [])], ROOF, LANES, num_layers=1) == pytest.approx(2 / 0.031)
    # A slower host (20 ms): one miss each way, max(11, 20, 10) = 20 ms, beats both on one lane.
    slow = Placement(LaneCosts(1e9, 0.5e9, 1e12, 0.0, 1e9, 1e15), 10**7, 5 * 10**6, "auto")
    assert three_lane_bound([(2, [1.0, 1.0])], ROOF, slow, num_layers=1) == pytest.approx(1 / 0.020)
    # An upload half done when the token began: the host takes the absent one (20 ms), the link
    # the rest of the other (5 ms): max(11, 20, 5) = 20 ms; without the host, max(21, 15) = 21 ms.
    assert three_lane_bound([(2, [0.5, 1.0])], ROOF, slow, num_layers=1) == pytest.approx(1 / 0.020)
    assert three_lane_bound([(3, [0.5, 0.5])], ROOF, slow, num_layers=1) == pytest.approx(1 / 0.021)


def test_no_simulated_replay_beats_its_bound():
    layers = [0, 1, 2, 3]
    trace = random_routing(layers, num_experts=8, top_k=2, tokens=24, prompt_tokens=4)["trace"]
    roof = Roofline(360e9, 25.5e12, 84e6, 352 * 2**20, 176 * 2**20, 67e6)
    lanes = LaneCosts(12e9, 25e9, 0.4e12, 40e-6, 360e9, 25.5e12)
    ratios = []
    for on_miss in ("wait", "host", "auto"):
        for predictor in ("none", "previous-token", "oracle"):
            for policy in ("lru", "lfu"):
                placement = Placement(lanes, roof.expert_bytes, roof.expert_params, on_miss)
                result = simulate(
                    trace,
                    cache_slots=8,
                    expert_bytes=roof.expert_bytes,
                    bandwidth=12e9,
                    moe_layer_ids=layers,
                    num_layers=4,
                    roofline=roof,
                    predictor=predictor,
                    lookahead=2,
                    placement=None if on_miss == "wait" else placement,
                    lanes=placement,
                    policy=policy,
                )
                assert result["policy"] == policy
                ratios.append(result["bound_tokens_per_s"] / result["tokens_per_s"])
    assert min(ratios) >= 1.0 - 1e-9 and max(ratios) > 1.2


def test_a_demand_copy_waits_for_the_chunk_in_progress_not_the_whole_prefetch():
    clock = Clock()
    loader = SimLoader(2, clock, bandwidth=1.0, expert_bytes=4, chunk_bytes=1)  # 4 s per copy, 1 s chunks
    loader.submit(0, None, None, 5.0)  # a prefetch starts at once on the idle link
    clock.now = 1.5
    loader.submit(1, None, None, 0.0)
    assert not loader.cancel(0), "a copy under way cannot be cancelled"
    assert loader.left(0) == pytest.approx(0.5), "two of its four chunks are moved or committed at 1.5 s"
    loader.wait(1, layer_idx=0)  # behind the chunk in progress (to 2 s), then 4 s of its own
    assert clock.now == pytest.approx(6.0)
    assert not loader.done(0)  # the prefetch resumes: its last two chunks take to 8 s
    clock.now = 8.0
    assert loader.done(0) and [e["slot"] for e in loader.events] == [1, 0]


def test_simulate_takes_on_miss_and_cache_policy_and_reports_the_bound():
    base = ["simulate", "--shape", "mixtral-8x7b", "--routing", "demo", "--predictor", "m2r2"]
    base += ["--profile", "rtx3060-12gb", "--host", "ddr4-3200-2ch", "--tokens", "8", "--json"]
    runs = {}
    for on_miss in ("wait", "auto"):
        result = CliRunner().invoke(app, [*base, "--on-miss", on_miss, "--cache-policy", "lfu"])
        assert result.exit_code == 0, result.output
        runs[on_miss] = json.loads(result.stdout)
    for on_miss, payload in runs.items():
        assert payload["on_miss"] == on_miss and payload["policy"] == "lfu" and payload["host"] == "ddr4-3200-2ch"
        assert payload["bound_tokens_per_s"] >= payload["tokens_per_s"] > 0
    assert runs["wait"]["host_experts"] == 0 < runs["auto"]["host_experts"]
    assert runs["auto"]["tokens_per_s"] > runs["wait"]["tokens_per_s"], "a PCIe 3.0 card with a DDR4 host"


@pytest.mark.parametrize("option", ["--on-miss", "--cache-policy"])
def test_simulate_refuses_an_unknown_choice(option):
    args = ["simulate", "--shape", "mixtral-8x7b", "--profile", "rtx3060-12gb", option, "sometimes"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "sometimes" in result.output and "Traceback" not in result.output


def test_bench_compares_cache_policies_with_the_bound_beside_each_row(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "shape:mixtral-8x7b", "--routing", "demo", "--on-miss", "auto"]
    args += ["--predictors", "none", "--cache-fractions", "0.5", "--profiles", "h100-80gb"]
    args += ["--host", "ddr4-3200-2ch", "--tokens", "8", "--cache-policy", "lru,lfu", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(out.read_text())["rows"] if r["on_miss"] == "auto"]
    assert sorted(r["policy"] for r in rows) == ["lfu", "lru"]
    for row in rows:
        sim, bound = row["simulated"]["h100-80gb"], row["bound"]["h100-80gb"]
        assert bound >= sim > 0 and row["bound_ratio"]["h100-80gb"] == pytest.approx(bound / sim)
    assert "policy" in result.stdout and "bound" in result.stdout
    bad = CliRunner().invoke(app, [*args[:-4], "--cache-policy", "lru,mru"])
    assert bad.exit_code == 2 and "mru" in bad.output and "Traceback" not in bad.output


def fewest_misses(accesses: list, slots: int) -> int:
    """Brute force: every choice of what to evict (or to bypass) on every miss, from the best
    starting content (any `slots` keys, free), the fewest misses."""
    import functools
    import itertools

    keys = sorted(set(accesses))

    @functools.cache
    def best(i: int, cached: frozenset) -> int:
        if i == len(accesses):
            return 0
        key = accesses[i]
        if key in cached:
            return best(i + 1, cached)
        options = [best(i + 1, cached)]  # bypass
        options += [best(i + 1, (cached - {victim}) | {key}) for victim in cached]
        if len(cached) < slots:
            options.append(best(i + 1, cached | {key}))
        return 1 + min(options)

    return min(best(0, frozenset(start)) for start in itertools.combinations(keys, min(slots, len(keys))))


def test_belady_with_bypass_is_the_fewest_misses_any_cache_can_have():
    import random

    from moe_prefetch.evidence.bounds import belady_misses

    rng = random.Random(0)
    for _ in range(40):
        accesses = [rng.randrange(6) for _ in range(rng.randrange(4, 12))]
        for slots in (1, 2, 3):
            assert belady_misses(accesses, slots) == fewest_misses(accesses, slots), (accesses, slots)


def test_no_policy_or_predictor_in_the_bench_beats_the_configuration_bound(tmp_path):
    """Belady's MIN on the same trace and slots, its misses split ideally between the host lane and
    the link over the window: every eviction policy, predictor and placement stays at or below it."""
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "shape:mixtral-8x7b", "--routing", "demo", "--tokens", "12", "--warmup", "4"]
    args += ["--predictors", "none,previous-token,next-gate,m2r2,oracle", "--on-miss", "wait,host,auto"]
    args += ["--cache-policy", "lru,lfu,lfru", "--experts-dtype", "bf16,int4", "--profiles", "rtx3060-12gb,h100-80gb"]
    args += ["--host-memory", "128GB", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(out.read_text())["rows"] if "config_bound" in r]
    assert len(rows) == 2 * 3 * 3 * 5
    ratios = []
    for row in rows:
        for profile, sim in row["simulated"].items():
            bound = row["config_bound"][profile]
            assert row["fits"][profile] and sim <= bound * (1 + 1e-9), (row["predictor"], row["on_miss"], profile)
            ratios.append(bound / sim)
    assert max(ratios) > 1.5, "the bound must not be the CPU lane everywhere: the check needs room to fail"
