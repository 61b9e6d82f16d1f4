"""Routing-driven shapes: a recorded demo trace mapped onto a reference shape's layers and experts."""

import json

import pytest
from typer.testing import CliRunner

from moe_prefetch.cli.main import app
from moe_prefetch.evidence import routing
from moe_prefetch.evidence.bench import SHAPES, shape_sizes
from moe_prefetch.evidence.sim import Roofline, simulate

# A 2-layer, 8-expert top-2 recording: 1 prefill step (3 tokens) and 3 decode steps.
RECORDING = {
    "model": "test",
    "moe_layer_ids": [0, 1],
    "num_experts": 8,
    "top_k": 2,
    "trace": [
        {"step": 0, "layer_idx": 0, "tokens": 3, "experts": [0, 1, 2, 5]},
        {"step": 0, "layer_idx": 1, "tokens": 3, "experts": [3, 4, 6]},
        {"step": 1, "layer_idx": 0, "tokens": 1, "experts": [0, 5]},
        {"step": 1, "layer_idx": 1, "tokens": 1, "experts": [3, 6]},
        {"step": 2, "layer_idx": 0, "tokens": 1, "experts": [0, 7]},
        {"step": 2, "layer_idx": 1, "tokens": 1, "experts": [4, 6]},
        {"step": 3, "layer_idx": 0, "tokens": 1, "experts": [1, 7]},
        {"step": 3, "layer_idx": 1, "tokens": 1, "experts": [4, 3]},
    ],
    "predictions": {"m2r2": [{"step": s, "layer_idx": 0, "predictions": [[1, 1, [6, 3, 4]]]} for s in range(4)]},
}


def test_layers_repeat_with_period_and_predictions_stay_within_a_copy():
    mapped = routing.repeat_onto(RECORDING, [0, 1, 2, 3, 4], num_experts=8, top_k=2)
    by = {(r["step"], r["layer_idx"]): r["experts"] for r in mapped["trace"]}
    for step in range(4):
        for layer in range(5):
            assert by[(step, layer)] == sorted(by[(step, layer % 2)])
    said = {(p["step"], p["layer_idx"]): p["predictions"] for p in mapped["predictions"]["m2r2"]}
    # made at copy starts 0 and 2 for the next layer; layer 4's copy has no layer 5 to predict
    assert sorted({layer for _, layer in said}) == [0, 2]
    assert said[(1, 2)] == [[3, 1, [6, 3, 4]]]


def test_more_experts_keep_ids_fewer_fold_them():
    wide = routing.repeat_onto(RECORDING, [0, 1], num_experts=16, top_k=2)
    assert [r["experts"] for r in wide["trace"]] == [sorted(r["experts"]) for r in RECORDING["trace"]]
    narrow = routing.repeat_onto(RECORDING, [0, 1], num_experts=4, top_k=2)
    for r, src in zip(narrow["trace"], RECORDING["trace"]):
        assert r["experts"] == sorted({e % 4 for e in src["experts"]})


def test_smaller_top_k_keeps_one_per_decode_token_by_a_fixed_order():
    mapped = routing.repeat_onto(RECORDING, [0, 1], num_experts=8, top_k=1, seed=3)
    decode = [r for r in mapped["trace"] if r["step"] >= 1]
    assert all(len(r["experts"]) == 1 for r in decode)
    prefill = [r for r in mapped["trace"] if r["step"] == 0]
    assert [r["experts"] for r in prefill] == [[0, 1, 2, 5], [3, 4, 6]]  # not per token: the union stays
    # the same fixed order decides every token: layer 0's steps 1 and 2 share expert 0, so
    # they keep it both times or drop it both times
    step1, step2 = decode[0]["experts"][0], decode[2]["experts"][0]
    assert (step1 == 0) == (step2 == 0)
    prediction = mapped["predictions"]["m2r2"][0]["predictions"][0]
    assert len(prediction[2]) == 2  # ceil(3 * 1 / 2)


def test_random_routing_has_top_k_per_decode_token():
    mapped = routing.random_routing([1, 2, 3], num_experts=64, top_k=6, tokens=5, prompt_tokens=4)
    decode = [r for r in mapped["trace"] if r["step"] >= 1]
    assert len(decode) == 15 and all(len(r["experts"]) == 6 for r in decode)
    assert all(6 < len(r["experts"]) <= 24 for r in mapped["trace"] if r["step"] == 0)


def test_repetition_makes_copies_identical():
    trace = routing.random_routing([0, 1, 2], num_experts=16, top_k=2, tokens=30)["trace"]
    real = routing.novelty_correlation(trace)
    recording = {**RECORDING, "trace": trace, "moe_layer_ids": [0, 1, 2], "num_experts": 16, "predictions": {}}
    repeated = routing.novelty_correlation(routing.repeat_onto(recording, list(range(6)), 16, 2)["trace"])
    assert real["identical_pairs"] == 0.0
    assert repeated["identical_pairs"] == pytest.approx(3 / 15)  # (0,3), (1,4), (2,5) of 15 pairs
    assert repeated["mean_novelty_correlation"] > real["mean_novelty_correlation"] + 0.1


def test_shape_sizes_at_real_depth():
    sizes = shape_sizes("qwen3-30b-a3b")
    assert sizes["num_layers"] == SHAPES["qwen3-30b-a3b"]["real_layers"] == len(sizes["moe_layer_ids"])
    assert (sizes["num_experts"], sizes["top_k"]) == (128, 8)
    assert sizes["expert_params"] * 2 == pytest.approx(9.0 * 2**20, rel=0.01)  # 9 MiB in bf16
    deepseek = shape_sizes("deepseek-v2-lite")
    assert deepseek["moe_layer_ids"][0] == 1  # first layer dense


def test_simulator_counts_decode_hits_apart_from_the_prefill():
    trace = [
        {"step": 0, "layer_idx": 0, "tokens": 4, "experts": [0, 1, 2, 3]},
        {"step": 1, "layer_idx": 0, "tokens": 1, "experts": [0, 1]},
        {"step": 2, "layer_idx": 0, "tokens": 1, "experts": [0, 1]},
    ]
    roofline = Roofline(1e12, 1e12, 1000, 100, 50)
    result = simulate(
        trace, cache_slots=4, expert_bytes=100, bandwidth=1e6, moe_layer_ids=[0], num_layers=1, roofline=roofline
    )
    assert result["decode_hit_rate"] == 1.0 and result["hit_rate"] == pytest.approx(4 / 8)


def test_bench_shape_with_demo_routing(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "shape:mixtral-8x7b", "--routing", "demo", "--tokens", "6", "--device", "cpu"]
    args += ["--predictors", "none,next-gate,m2r2,oracle", "--cache-fractions", "0.25,0.5"]
    result = CliRunner().invoke(app, [*args, "--profiles", "rtx3060-12gb", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["meta"]["layers"] == 32 and data["meta"]["measured_on"] == "simulated"
    assert data["meta"]["routing_source"] == {"model": "demo", "moe_layers": 6, "experts": 8, "top_k": 2}
    rows = {(r["predictor"], r["cache_fraction"]): r for r in data["rows"]}
    assert rows[("m2r2", 0.5)]["tokens_per_s"] is None and rows[("m2r2", 0.5)]["simulated"]["rtx3060-12gb"] > 0
    # real routing is local: the oracle beats on-demand, and the trained predictor beats nothing
    assert rows[("oracle", 0.25)]["decode_hit_rate"] > rows[("none", 0.25)]["decode_hit_rate"]
    assert rows[("m2r2", 0.25)]["prefetch_precision"] > 0.5


def test_simulate_shape_with_random_and_demo_routing():
    runner = CliRunner()
    base = ["simulate", "--shape", "olmoe-1b-7b", "--profile", "rtx4090-24gb", "--tokens", "4", "--json"]
    random = runner.invoke(app, [*base, "--routing", "random", "--predictor", "none"])
    assert random.exit_code == 0, random.output
    assert json.loads(random.stdout)["decode_tokens"] == 4
    refused = runner.invoke(app, [*base, "--routing", "random", "--predictor", "m2r2"])
    assert refused.exit_code != 0 and "demo-fine" in refused.output
    real = runner.invoke(app, [*base, "--routing", "demo-fine", "--predictor", "m2r2", "--cache-slots", "256"])
    assert real.exit_code == 0, real.output
    result = json.loads(real.stdout)
    assert result["routing"] == "demo-fine" and result["cache_slots"] == 256 and result["prefetch_issued"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--model", "demo", "--routing", "demo"], "drop --routing"),
        (["bench", "--model", "shape:olmoe-1b-7b", "--routing", "mixtral"], "unknown routing"),
        (["simulate", "--profile", "rtx4090-24gb"], "--trace"),
    ],
)
def test_routing_errors_name_the_fix(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and message in result.output
