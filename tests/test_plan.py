"""`plan`: every option sized to the device and host, simulated, and a recommendation that fits;
the CPU lane bounds a tiny model; a trace is never expanded onto more experts than it recorded."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moe_prefetch.cli.main import app
from moe_prefetch.errors import ConfigError
from moe_prefetch.evidence import routing
from moe_prefetch.evidence.plan import plan
from moe_prefetch.evidence.shapes import SHAPES
from moe_prefetch.runtime import profiles as hw

OPTION_KEYS = (
    "experts_dtype",
    "on_miss",
    "predictor",
    "cache_slots",
    "device_bytes",
    "host_bytes",
    "fits",
    "simulated_tokens_per_s",
    "bound_tokens_per_s",
    "config_bound_tokens_per_s",
)


def test_plan_writes_the_contract_json(tmp_path):
    out = tmp_path / "plan.json"
    args = ["plan", "--model", "shape:qwen3-30b-a3b", "--profile", "rtx3060-12gb", "--host", "ddr4-3200-2ch"]
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data) >= {"options", "recommended"} and data["measured_on"] == "simulated"
    assert "simulated" in data["note"] and "simulated" in result.stdout
    for option in data["options"]:
        assert all(key in option for key in OPTION_KEYS), option
        if option["fits"]:
            assert option["simulated_tokens_per_s"] > 0
            assert option["config_bound_tokens_per_s"] >= option["simulated_tokens_per_s"] * (1 - 1e-9)
        else:
            assert option["simulated_tokens_per_s"] is None and option["why_not"]
    assert {o["predictor"] for o in data["options"]} == {"none", "previous-token", "next-gate", "oracle"}  # no m2r2
    rec = data["recommended"]
    assert rec["fits"] and rec["predictor"] != "oracle"
    assert {k: rec[k] for k in OPTION_KEYS} in [{k: o[k] for k in OPTION_KEYS} for o in data["options"]]
    # 54 GiB of bf16 experts and 27 GiB of int8 do not fit 24 GiB of pinnable DDR4: int4 it is.
    assert rec["experts_dtype"] == "int4" and data["stores_that_fit"] == ["int4"]
    assert rec["command"].startswith("moe-prefetch run --model ./Qwen3-30B-A3B --experts-dtype int4")
    assert f"--cache-slots {rec['cache_slots']}" in rec["command"] and "--host ddr4-3200-2ch" in rec["command"]
    assert rec["command"] in result.stdout.replace("\n", " ") or rec["command"].split()[-1] in result.stdout
    # the oracle's row shows each predictor's share of the best possible gain
    assert any(o["oracle_share"] == pytest.approx(1.0) for o in data["options"] if o["predictor"] == "oracle")


@pytest.mark.slow
@pytest.mark.parametrize("model", [f"shape:{name}" for name in SHAPES] + ["demo"])
def test_plan_recommends_a_fitting_option_on_every_profile(model):
    for profile in hw.list_profiles():
        result = plan(model, profile, tokens=3, warmup=2)
        rec = result["recommended"]
        assert rec is not None and rec["fits"], (model, profile.name)
        assert rec["device_bytes"] <= profile.usable_bytes
        assert rec["host_bytes"] <= hw.load_host_profile("ddr4-3200-2ch").memory_bytes * 0.75
        assert rec["command"].startswith("moe-prefetch run --model ")
        options = result["options"]
        assert {o["on_miss"] for o in options} == {"wait", "host", "auto"}
        assert ("m2r2" in {o["predictor"] for o in options}) == (model == "demo")  # adapters: the demo's only
        for option in options:
            if option["fits"]:
                assert option["simulated_tokens_per_s"] <= option["config_bound_tokens_per_s"] * (1 + 1e-9)
                assert option["simulated_tokens_per_s"] <= option["cpu_bound_tokens_per_s"] * (1 + 1e-9)


def test_plan_on_a_checkpoint_folder_replays_its_own_routing(tmp_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(
        app, ["plan", "--model", "demo", "--profile", "rtx3060-12gb", "--tokens", "4", "--warmup", "2", "--json", out]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["routing"] == "own" and data["recommended"]["command"].startswith("moe-prefetch run --model demo")


def test_a_tiny_model_is_bounded_by_the_cpu_lane():
    """The demo (6 layers, 12M parameters) on an H200: the device would take microseconds; the
    framework's and the runtime's host time per layer set the speed, and the plan says so."""
    result = plan("demo", hw.load_profile("h200"), tokens=4, warmup=2)
    host = hw.load_host_profile("ddr4-3200-2ch")
    cpu = 1 / (6 * (host.framework_layer_s + host.runtime_layer_s) + host.framework_token_s)
    for option in result["options"]:
        assert option["cpu_bound_tokens_per_s"] == pytest.approx(cpu)
        assert 0.9 * cpu <= option["simulated_tokens_per_s"] <= cpu * (1 + 1e-9)
    assert "CPU lane caps" in result["recommended"]["reason"]


def test_simulate_says_the_cpu_lane_bounds_a_tiny_model(tmp_path):
    runner = CliRunner()
    report = tmp_path / "rep"
    run = runner.invoke(app, ["run", "--cache-slots", "24", "--prompt", "def f(x):", "--report", str(report)])
    assert run.exit_code == 0, run.output
    result = runner.invoke(app, ["simulate", "--trace", str(report), "--profile", "h200", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["tokens_per_s"] <= payload["cpu_bound_tokens_per_s"] * (1 + 1e-9)
    assert payload["tokens_per_s"] < 200  # not the 86,402 tok/s of a device-only roofline
    assert payload["fit"]["fits"]
    text = runner.invoke(app, ["simulate", "--trace", str(report), "--profile", "h200"]).stdout
    assert "CPU lane: at most" in " ".join(text.split())


@pytest.mark.parametrize(
    "recorded, experts, top_k, message",
    [
        ({"model": "demo", "num_experts": 8, "top_k": 2}, 128, 8, "routes 2 experts per token"),
        ({"model": "demo", "num_experts": 8, "top_k": 2}, 64, 2, "has 8 experts per layer"),
        ({"model": "demo-fine", "num_experts": 64, "top_k": 8}, 256, 8, "has 64 experts per layer"),
    ],
)
def test_a_trace_is_never_expanded(recorded, experts, top_k, message):
    with pytest.raises(ConfigError, match=message) as err:
        routing.check_expansion(recorded, experts, top_k)
    assert "--routing demo-fine" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        routing.repeat_onto({**recorded, "trace": [], "predictions": {}, "moe_layer_ids": [0]}, [0], experts, top_k)


def test_demo_fine_on_qwen3_is_the_widest_allowed_and_fewer_experts_fold():
    routing.check_expansion({"num_experts": 64, "top_k": 8}, 128, 8)  # 2x the trace's experts per layer
    routing.check_expansion({"num_experts": 64, "top_k": 8}, 32, 4)  # GPT-OSS: fewer, folded, top-4 of 8


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "--model", "shape:qwen3-30b-a3b", "--routing", "demo", "--tokens", "2", "--warmup", "0"],
        ["simulate", "--shape", "olmoe-1b-7b", "--routing", "demo", "--profile", "rtx4090-24gb"],
        ["plan", "--model", "shape:gpt-oss-20b", "--profile", "rtx4090-24gb", "--routing", "demo"],
    ],
)
def test_the_cli_refuses_an_expanded_trace_naming_demo_fine(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--routing demo-fine" in result.output and "Traceback" not in result.output
