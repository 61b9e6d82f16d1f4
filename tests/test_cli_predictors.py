"""train-predictor, eval-predictor, bench and simulate through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
from test_cli import assert_one_line_error, make_checkpoint, run_args
from typer.testing import CliRunner

from moe_prefetch.cli.main import app

TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\nhello world\n" * 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred_cli")
    ckpt = make_checkpoint(root / "model")
    data = root / "train.txt"
    data.write_text(TEXT)
    return ckpt, data, root


@pytest.fixture(scope="module")
def adapters(setup):
    ckpt, data, root = setup
    out = ckpt / "m2r2_adapters.safetensors"
    result = CliRunner().invoke(
        app,
        [
            "train-predictor",
            "--model",
            str(ckpt),
            "--data",
            str(data),
            "--out",
            str(out),
            "--lookahead",
            "1",
            "--rank",
            "4",
            "--steps",
            "30",
            "--max-tokens",
            "3000",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, result


def test_train_predictor_writes_adapters(adapters):
    out, result = adapters
    assert out.is_file() and not out.with_suffix(".safetensors.ckpt").exists()
    assert "m2r2 recall" in result.stdout and "final loss" in result.stdout


def test_eval_predictor_table_and_json(setup, adapters, tmp_path):
    ckpt, data, _ = setup
    out_json = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval-predictor",
            "--model",
            str(ckpt),
            "--data",
            str(data),
            "--lookahead",
            "1",
            "--max-tokens",
            "2000",
            "--device",
            "cpu",
            "--json",
            str(out_json),
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("previous-token", "next-gate", "m2r2"):
        assert name in result.stdout
    payload = json.loads(out_json.read_text())
    assert 0.0 <= payload["predictors"]["m2r2"]["by_distance"]["1"]["recall"] <= 1.0


def test_eval_predictor_refuses_foreign_adapters(setup, adapters, tmp_path):
    ckpt, data, _ = setup
    other = make_checkpoint(tmp_path / "other", seed=3)
    result = CliRunner().invoke(
        app,
        [
            "eval-predictor",
            "--model",
            str(other),
            "--data",
            str(data),
            "--predictor-path",
            str(adapters[0]),
            "--device",
            "cpu",
        ],
    )
    assert_one_line_error(result, "trained for another model")


def test_bench_json_rows(setup, adapters, tmp_path):
    ckpt, _, _ = setup
    out_json = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(ckpt),
            "--predictors",
            "none,next-gate,m2r2,oracle",
            "--cache-fractions",
            "0.25",
            "--profiles",
            "rtx3060-12gb",
            "--tokens",
            "6",
            "--lookahead",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out_json),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out_json.read_text())["rows"]
    measured = [r for r in rows if r["tokens_per_s"] is not None]
    assert {r["predictor"] for r in measured} == {"none", "next-gate", "m2r2", "oracle"}
    for row in measured:
        for key in ("cache_fraction", "hit_rate", "prefetch_precision", "prefetch_recall", "tokens_per_s"):
            assert row[key] is not None
        assert row["simulated"]["rtx3060-12gb"] > 0
    assert {"all-resident", "bandwidth-bound-on-demand"} <= {r["predictor"] for r in rows}
    # The table: labels whole, simulated columns with units, the terms explained (issues 12, 22).
    table = " ".join(result.stdout.split())
    for label in ("bandwidth-bound-on-demand", "next-gate", "decode hit:", "pf prec: prefetch precision"):
        assert label in table, label
    assert "sim PROFILE: steady-state decode tokens/s simulated on that hardware profile" in table
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.rstrip().endswith("rtx3060-"))  # the name, stacked
    assert lines[header - 1].rstrip().endswith("sim") and lines[header + 1].rstrip().endswith("12gb")
    assert "…" not in result.stdout
    # Every row is sized to the profile: slots, fit, device and host bytes per profile.
    for row in rows:
        for key in ("cache_slots", "fits", "device_bytes", "host_bytes"):
            assert set(row[key]) == {"rtx3060-12gb"}, key
        assert row["fits"]["rtx3060-12gb"] is True  # a 16-expert toy fits any card


def test_bench_unknown_shape_is_one_line():
    assert_one_line_error(CliRunner().invoke(app, ["bench", "--model", "shape:nope"]), "unknown shape")


def test_simulate_a_recorded_run(setup, tmp_path):
    ckpt, _, _ = setup
    report = tmp_path / "rep"
    result = CliRunner().invoke(
        app, run_args(ckpt, "--cache-slots", "4", "--predictor", "next-gate", "--report", str(report))
    )
    assert result.exit_code == 0, result.output
    simulate = ["simulate", "--trace", str(report / "run.json"), "--profile", "rtx4090-24gb"]
    result = CliRunner().invoke(app, [*simulate, "--warmup", "32"])
    assert result.exit_code == 2 and "--warmup" in result.output, "a run too short to warm up and measure"
    result = CliRunner().invoke(app, simulate)  # a short run warms up for half its decode tokens
    assert result.exit_code == 0, result.output
    assert "after 3 of warm-up" in " ".join(result.stdout.split())
    assert "tokens/s" in result.stdout and "exposed transfer" in result.stdout and "CPU lane" in result.stdout
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--trace",
            str(report / "run.json"),
            "--profile",
            "rtx4090-24gb",
            "--predictor",
            "oracle",
            "--cache-slots",
            "6",
            "--warmup",
            "2",
            "--json",
        ],
    )
    payload = json.loads(result.stdout)
    assert payload["predictor"] == "oracle" and payload["cache_slots"] == 6 and payload["tokens_per_s"] > 0


def test_simulate_missing_file_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["simulate", "--trace", str(tmp_path / "none.json"), "--profile", "h200"])
    assert_one_line_error(result, "does not exist")


def test_train_predictor_ctrl_c_then_resume(setup, tmp_path, monkeypatch):
    import moe_prefetch.predict.m2r2 as m2r2

    ckpt, data, _ = setup
    # a folder deep enough that the message is longer than the 120 columns of a non-terminal
    folder = tmp_path / "runs" / ("adapters-of-a-model-with-a-long-name-" * 2)
    folder.mkdir(parents=True)
    out = folder / "adapters.safetensors"
    args = [
        "train-predictor",
        "--model",
        str(ckpt),
        "--data",
        str(data),
        "--out",
        str(out),
        "--lookahead",
        "1",
        "--rank",
        "4",
        "--steps",
        "120",
        "--max-tokens",
        "2000",
        "--device",
        "cpu",
    ]
    real_step, calls = m2r2._train_step, []

    def step_then_interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 105:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(m2r2, "_train_step", step_then_interrupt)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    message = f"interrupted: progress saved to {out}.ckpt; run the same command to resume"
    assert len(message) > 120 and message in result.stderr  # one line, whole
    assert (folder / "adapters.safetensors.ckpt").is_file() and not out.exists()
    monkeypatch.setattr(m2r2, "_train_step", real_step)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and not (folder / "adapters.safetensors.ckpt").exists()
