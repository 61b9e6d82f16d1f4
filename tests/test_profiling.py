"""The report's rates are the records' rates: decode tokens/s, H2D bytes/s and the decode hit
rate in run.json's summary, recomputed from the token, loader and trace records beside them."""

import json

import pytest
from test_cli import make_checkpoint, run_args
from typer.testing import CliRunner

from moe_prefetch.cli.main import app


@pytest.fixture(scope="module", params=["wait", "host"])
def run(request, tmp_path_factory):
    """A CLI run of a tiny Mixtral with 5 slots: misses wait for their copies, or run on the host.
    The host case takes a desktop host profile's lanes, where a use on the device saves host time,
    so experts are still uploaded and there are copies to rate (on a CPU device's own lanes,
    on_miss="host" copies nothing: no copy could pay)."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("model"))
    out = tmp_path_factory.mktemp("report")
    args = run_args(ckpt, "--cache-slots", "5", "--predictor", "next-gate", "--on-miss", request.param)
    if request.param == "host":
        args = [*args, "--host", "ddr4-3200-2ch"]
    result = CliRunner().invoke(app, [*args, "--report", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "run.json").read_text())


def test_decode_tokens_per_second_is_tokens_after_the_first_over_their_wall_time(run):
    decode = run["tokens"][1:]
    assert len(decode) > 2
    wall = sum(token["wall_s"] for token in decode)  # each token's own time, not the clock `t`
    assert run["summary"]["decode_tokens_per_s"] == pytest.approx(len(decode) / wall, rel=1e-9)
    assert run["summary"]["decode_wall_s"] == pytest.approx(wall, rel=1e-9)


def test_h2d_rate_on_cpu_is_bytes_copied_over_the_loader_busy_time(run):
    """With timed copies, bytes over the time the loader was busy; with none (every miss served on
    the host lane), the bytes loaded over the run's wall time."""
    loads = [e for e in run["loads"] if "start" in e and "end" in e]
    summary = run["summary"]
    assert run["measured_on"] == "cpu"
    if run["stats"]["on_miss"] == "wait":
        assert loads, "every miss waits for a copy"
    if not loads:
        assert summary["h2d_basis"] == "bytes over wall time"
        expected = run["stats"]["bytes_loaded"] / run["tokens"][-1]["t"]
        assert summary["h2d_bytes_per_s"] == pytest.approx(expected, rel=1e-9)
        return
    copied = sum(e["bytes"] for e in loads)
    assert 0 < copied <= run["stats"]["bytes_loaded"]  # a copy still in flight at the end has no `end`
    busy = sum(e["end"] - e["start"] for e in loads)
    assert summary["h2d_basis"] == "bytes over loader busy time"
    assert summary["h2d_bytes_per_s"] == pytest.approx(copied / busy, rel=1e-9)


def test_decode_hit_rate_leaves_out_the_prefill(run):
    """Device hits over every expert routed in steps 1.. (wherever it ran), from the trace; the
    prefill (step 0) misses nearly everything and would pull the rate down."""
    decode = [r for r in run["trace"] if r["step"] >= 1]
    hits = sum(r["hits"] for r in decode)
    routed = sum(r["hits"] + r["misses"] + len(r["host"]) for r in decode)
    assert routed > 0
    assert run["summary"]["decode_hit_rate"] == pytest.approx(hits / routed, rel=1e-9)
    prefill = [r for r in run["trace"] if r["step"] == 0]
    assert sum(r["misses"] + len(r["host"]) for r in prefill) > 0, "the prefill routes experts that are not resident"
