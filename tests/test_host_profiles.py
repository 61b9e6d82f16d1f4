"""Host profiles: the shipped files, lookup and errors, lane_costs, and the CLI's --host, profiles and calibrate."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from moe_prefetch.cli.main import app
from moe_prefetch.errors import ConfigError
from moe_prefetch.runtime import profiles as hw
from moe_prefetch.runtime.config import RuntimeConfig, config_for
from moe_prefetch.runtime.placement import HOST_LAYER_S, LaneCosts

SHIPPED_HOSTS = ("ddr4-3200-2ch", "ddr5-6000-2ch", "server-ddr5-8ch", "jetson-unified")


@pytest.fixture()
def runner(monkeypatch, tmp_path):
    monkeypatch.delenv("MOE_PREFETCH_DEBUG", raising=False)
    monkeypatch.setenv("MOE_PREFETCH_PROFILES", str(tmp_path / "no-profiles-here"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # never read the developer's own profiles
    return CliRunner()


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- the shipped files -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED_HOSTS)
def test_shipped_host_profile_loads_with_a_source_for_every_number(name):
    host = hw.load_host_profile(name)
    assert host.name == name and host.path.parent == hw.SHIPPED_DIR / "host"
    for key in hw.HOST_NUMBERS:
        assert getattr(host, key) > 0
        assert len(host.sources[key].strip()) > 40, f"{name}: {key} needs a real citation"
    # Achieved figures sit below the theoretical peak, and estimates say they are estimates.
    assert host.expert_bytes_per_s <= host.dram_bandwidth_bytes_per_s <= host.dram_peak_bytes_per_s
    assert "ESTIMATE" in host.sources["dram_bandwidth_bytes_per_s"]
    assert host.compute_dtype == "bfloat16"
    assert host.unified_memory == (name == "jetson-unified")


def test_every_shipped_host_file_is_listed():
    names = [h.name for h in hw.list_host_profiles()]
    assert sorted(p.stem for p in (hw.SHIPPED_DIR / "host").glob("*.toml")) == sorted(names)
    assert set(SHIPPED_HOSTS) <= set(names)
    assert not set(names) & {p.name for p in hw.list_profiles()}  # host and device names never clash


def test_unknown_host_profile_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError) as err:
        hw.load_host_profile("ddr3-1600")
    message = str(err.value)
    assert "\n" not in message and "unknown host profile 'ddr3-1600'" in message
    assert all(name in message for name in SHIPPED_HOSTS)


def test_host_profiles_use_the_device_search_order(monkeypatch, tmp_path):
    """$MOE_PREFETCH_PROFILES/host, then the user folder's host/, then the shipped ones."""
    env, user = tmp_path / "env", tmp_path / "config"
    monkeypatch.setenv("MOE_PREFETCH_PROFILES", str(env))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(user))
    assert hw.host_profile_dirs()[-1] == hw.SHIPPED_DIR / "host"
    shipped = hw.SHIPPED_DIR / "host" / "ddr4-3200-2ch.toml"
    mine = user / "moe-prefetch" / "profiles" / "host"
    mine.mkdir(parents=True)
    (mine / "ddr4-3200-2ch.toml").write_text(shipped.read_text().replace("physical_cores = 8", "physical_cores = 6"))
    assert hw.load_host_profile("ddr4-3200-2ch").physical_cores == 6
    (env / "host").mkdir(parents=True)
    (env / "host" / "ddr4-3200-2ch.toml").write_text(
        shipped.read_text().replace("physical_cores = 8", "physical_cores = 4")
    )
    assert hw.load_host_profile("ddr4-3200-2ch").physical_cores == 4
    assert hw.load_host_profile(str(shipped)).physical_cores == 8  # a path is read as given


def test_host_profile_without_a_source_or_above_its_peak_is_refused(tmp_path):
    text = (hw.SHIPPED_DIR / "host" / "ddr5-6000-2ch.toml").read_text()
    unsourced = tmp_path / "ddr5-6000-2ch.toml"
    unsourced.write_text("\n".join(line for line in text.splitlines() if not line.startswith('host_flops = "')))
    with pytest.raises(ConfigError, match=r"\[sources\] lacks host_flops"):
        hw.read_host_profile(unsourced)
    too_fast = tmp_path / "fast" / "ddr5-6000-2ch.toml"
    too_fast.parent.mkdir()
    too_fast.write_text(text.replace("dram_bandwidth_bytes_per_s = 60.0e9", "dram_bandwidth_bytes_per_s = 100e9"))
    with pytest.raises(ConfigError, match="exceeds dram_peak_bytes_per_s"):
        hw.read_host_profile(too_fast)


# -- lane_costs ------------------------------------------------------------------------------------
def test_lane_costs_take_the_link_and_device_from_the_device_and_the_host_lane_from_the_host():
    costs = hw.lane_costs(hw.load_profile("rtx3060-12gb"), hw.load_host_profile("ddr4-3200-2ch"))
    assert costs == LaneCosts(
        link_bytes_per_s=12.0e9,
        host_bytes_per_s=25.0e9,
        host_flops=0.4e12,
        host_call_s=40e-6,
        device_bytes_per_s=360.0e9,
        device_flops=25.5e12,
        host_layer_s=HOST_LAYER_S,  # the lane's pass, the same on every host (placement.py)
    )
    server = hw.lane_costs(hw.load_profile("h100-80gb"), hw.load_host_profile("server-ddr5-8ch"))
    assert (server.link_bytes_per_s, server.host_bytes_per_s, server.host_call_s) == (50.0e9, 150.0e9, 60e-6)


def test_unified_memory_makes_the_link_free():
    orin = hw.load_profile("jetson-agx-orin-64gb")
    assert orin.h2d_bandwidth_bytes_per_s == 80.0e9  # the device file alone prices an explicit copy
    costs = hw.lane_costs(orin, hw.load_host_profile("jetson-unified"))
    assert costs.link_bytes_per_s == math.inf and 352e6 / costs.link_bytes_per_s == 0.0
    assert costs.host_bytes_per_s == 50.0e9 and costs.device_bytes_per_s == 204.8e9


def test_default_lane_costs_are_pcie4_with_the_ddr4_desktop():
    costs = hw.default_lane_costs()
    ddr4 = hw.load_host_profile("ddr4-3200-2ch")
    assert costs.link_bytes_per_s == 25.0e9
    assert (costs.host_bytes_per_s, costs.host_flops, costs.host_call_s) == (
        ddr4.expert_bytes_per_s,
        ddr4.host_flops,
        ddr4.expert_call_overhead_s,
    )
    assert (costs.device_bytes_per_s, costs.device_flops) == (360.0e9, 25.5e12)


def test_default_lane_costs_ignore_user_profiles(monkeypatch, tmp_path):
    mine = tmp_path / "host"
    mine.mkdir()
    text = (hw.SHIPPED_DIR / "host" / "ddr4-3200-2ch.toml").read_text()
    (mine / "ddr4-3200-2ch.toml").write_text(text.replace("expert_bytes_per_s = 25.0e9", "expert_bytes_per_s = 1e9"))
    monkeypatch.setenv("MOE_PREFETCH_PROFILES", str(tmp_path))
    assert hw.load_host_profile("ddr4-3200-2ch").expert_bytes_per_s == 1e9
    assert hw.default_lane_costs().host_bytes_per_s == 25.0e9


def test_runtime_config_takes_a_host_profile_name():
    assert RuntimeConfig().host_profile is None
    assert config_for("load", host_profile="ddr4-3200-2ch").host_profile == "ddr4-3200-2ch"


# -- CLI -------------------------------------------------------------------------------------------
def test_profiles_lists_devices_then_hosts_and_shows_a_host(runner):
    listed = runner.invoke(app, ["profiles"])
    assert listed.exit_code == 0, listed.output
    assert "rtx3060-12gb" in listed.stdout and "host profiles" in listed.stdout
    hosts = listed.stdout.split("host profiles", 1)[1]
    for name in SHIPPED_HOSTS:
        assert name in hosts
    assert "rtx3060-12gb" not in hosts and "unified (free)" in hosts
    shown = runner.invoke(app, ["profiles", "jetson-unified"])
    assert shown.exit_code == 0, shown.output
    assert "free: unified memory" in shown.stdout and "204.8 GB/s" in shown.stdout
    assert "expert_call_overhead_s" in shown.stdout  # the sources follow


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--prompt", "x", "--device", "cpu"],
        ["bench", "--model", "shape:mixtral-8x7b"],
        ["simulate", "--trace", "no-such-run.json", "--profile", "rtx3060-12gb"],
    ],
    ids=["run", "bench", "simulate"],
)
def test_unknown_host_exits_2_with_one_line(runner, args):
    one_line_error(
        runner.invoke(app, [*args, "--host", "ddr3-1600"]), "unknown host profile 'ddr3-1600'", "ddr4-3200-2ch"
    )


def test_run_passes_the_host_profile_into_the_load_options(runner, monkeypatch):
    from moe_prefetch.cli import generate

    seen = {}

    def fake_record_run(folder, options, *args, **kwargs):
        seen.update(options)
        raise SystemExit(0)  # stop before generating: only the options are under test

    monkeypatch.setattr(generate, "record_run", fake_record_run)
    result = runner.invoke(app, ["run", "--prompt", "import os", "--device", "cpu", "--host", "ddr5-6000-2ch"])
    assert result.exit_code == 0, result.output
    assert seen["host_profile"] == "ddr5-6000-2ch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host-only path is for CPU-only machines")
def test_calibrate_measures_the_host_into_a_loadable_profile(runner, tmp_path):
    out = tmp_path / "hosts" / "this-box.toml"
    result = runner.invoke(app, ["calibrate", "--host-size", "small", "--host-threads", "1", "--host-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "no CUDA device: measured the host lane only" in result.stdout and str(out) in result.stdout
    host = hw.load_host_profile(str(out))
    assert host.name == "this-box" and not host.unified_memory and host.compute_dtype == "bfloat16"
    measured = [key for key in hw.HOST_NUMBERS if key != "pinnable_fraction"]  # a share of RAM is a choice
    assert all(host.sources[key].startswith("MEASURED") for key in measured)
    assert host.sources["pinnable_fraction"].startswith("NOT MEASURED")
    assert host.dram_bandwidth_bytes_per_s <= host.dram_peak_bytes_per_s
    assert host.memory_bytes > 2**30 and host.framework_layer_s > 0  # this machine's RAM and CPU lane
    # `--host local` finds the newest measured host profile in the user folder.
    # It combines with a device profile like any shipped host.
    assert hw.lane_costs(hw.load_profile("rtx4090-24gb"), host).host_bytes_per_s == host.expert_bytes_per_s
    # Default place: the user folder's host/, where --host finds it by name.
    default = runner.invoke(app, ["calibrate", "--host-size", "small", "--host-threads", "1"])
    assert default.exit_code == 0, default.output
    (written,) = (tmp_path / "config" / "moe-prefetch" / "profiles" / "host").glob("*.toml")
    assert hw.load_host_profile(written.stem).path == written
    assert hw.load_host_profile("local").path == written


def test_calibrate_refuses_a_bad_host_size_before_measuring(runner, tmp_path):
    one_line_error(runner.invoke(app, ["calibrate", "--host-size", "huge"]), "--host-size 'huge'", "small")
