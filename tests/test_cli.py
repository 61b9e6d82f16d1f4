"""The `moe-prefetch` command through typer's CliRunner: exit codes, key lines, files written."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from moe_prefetch import MoePrefetchError
from moe_prefetch.cli.main import app
from moe_prefetch.evidence.anatomy import anatomy
from moe_prefetch.evidence.calibration import measured_profile
from moe_prefetch.report import profiling
from moe_prefetch.report import text as report_text
from moe_prefetch.runtime import profiles as hw

MAX_NEW = 8


def make_checkpoint(folder, seed: int = 0):
    """A 2-layer, 8-expert, top-2 Mixtral with a byte-level BPE tokenizer. No EOS, so
    generation always runs to max_new_tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, MixtralConfig, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["def fibonacci(n):\n    return n", "hello world"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(folder)
    config = MixtralConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli_model"))


@pytest.fixture()
def runner(monkeypatch, tmp_path):
    monkeypatch.delenv("MOE_PREFETCH_DEBUG", raising=False)
    monkeypatch.setenv("MOE_PREFETCH_PROFILES", str(tmp_path / "no-profiles-here"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # never read the developer's own profiles
    return CliRunner()


def run_args(ckpt, *extra):
    return [
        "run",
        "--model",
        str(ckpt),
        "--prompt",
        "def fibonacci(n):",
        "--max-new-tokens",
        str(MAX_NEW),
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="session")
def recorded(ckpt, tmp_path_factory):
    """One run with a report, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(
        app, run_args(ckpt, "--cache-slots", "5", "--predictor", "next-gate", "--report", str(out))
    )
    assert result.exit_code == 0, result.output
    return result, out


@pytest.fixture(scope="session")
def recorded_int4(tmp_path_factory):
    """A run with int4 experts, on a checkpoint of its own (its quantized copy is written beside it)."""
    folder = make_checkpoint(tmp_path_factory.mktemp("cli_int4"))
    out = tmp_path_factory.mktemp("report_int4")
    result = CliRunner().invoke(
        app, run_args(folder, "--cache-slots", "5", "--experts-dtype", "int4", "--report", str(out))
    )
    assert result.exit_code == 0, result.output
    return folder, result, out


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- run ----------------------------------------------------------------------------------
def test_run_streams_text_and_writes_a_valid_report(recorded):
    result, out = recorded
    run = profiling.load_run(out / "run.json")
    assert run["schema"] == "moe-prefetch/run" and run["version"] == profiling.VERSION
    assert run["measured_on"] == "cpu" and run["stall_timing"] == "cpu-wait" and not run["interrupted"]
    # stdout is the prompt (echoed) then the streamed text; the report holds both.
    assert run["text"] and run["config"]["prompt"] == "def fibonacci(n):"
    assert result.stdout.strip() == ("def fibonacci(n):" + run["text"]).strip()
    assert "hit rate" in result.stderr and "report:" in result.stderr
    tokens, stats = run["tokens"], run["stats"]
    assert [t["step"] for t in tokens] == list(range(MAX_NEW))
    assert sorted({r["step"] for r in run["trace"]}) == list(range(MAX_NEW))
    # Per-token deltas add up to the runtime's totals, per layer too.
    for key in ("hits", "misses", "prefetch_issued", "prefetch_used", "bytes_loaded"):
        assert sum(t[key] for t in tokens) == stats[key]
        for layer in run["layers"]:
            assert (
                sum(p[key] for t in tokens for p in t["per_layer"] if p["layer_idx"] == layer["layer_idx"])
                == layer[key]
            )
    assert stats["hits"] + stats["misses"] + stats["host_experts"] == sum(len(r["experts"]) for r in run["trace"])
    assert stats["cache_slots"] == 5 and stats["predictor"] == "next-gate" and stats["prefetch_issued"] > 0
    assert [layer["layer_idx"] for layer in run["layers"]] == [0, 1]
    # What the simulator needs to replay the run is in it too.
    assert len(run["step_starts"]) == MAX_NEW and run["model"]["num_layers"] == 2
    assert run["predictions"] and {p["step"] for p in run["predictions"]} == set(range(MAX_NEW))
    # Occupancy: one row per token, every slot counted once.
    occ = run["occupancy"]
    assert occ["slots"] == 5 and len(occ["per_token"]) == MAX_NEW
    assert all(sum(row) == 5 for row in occ["per_token"])
    # Summary numbers are the records' numbers.
    s = run["summary"]
    assert s["tokens_generated"] == MAX_NEW and 0 < s["time_to_first_token_s"] == tokens[0]["t"]
    routed = stats["hits"] + stats["misses"] + stats["host_experts"]
    assert s["hit_rate"] == pytest.approx(stats["hits"] / routed) and s["host_experts"] == stats["host_experts"]
    # of the routed experts not already resident (uploaded, waited, host), the share a prefetch staged
    assert s["prefetch_recall"] == pytest.approx(stats["prefetch_used"] / (routed - stats["ran"]["device"]))
    assert s["device_pool_bytes"] == 5 * stats["expert_bytes"] and s["host_store_bytes"] >= 16 * stats["expert_bytes"]
    assert s["h2d_bytes_per_s"] > 0 and s["decode_tokens_per_s"] > 0
    html = (out / "report.html").read_text()
    assert (
        "<svg" in html
        and "Measured on CPU" in html
        and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    assert not list(out.glob(".*tmp")), "temporary files left behind"


def test_run_with_int4_experts_says_so_everywhere(recorded, recorded_int4, runner):
    folder, result, out = recorded_int4
    run, plain = profiling.load_run(out), profiling.load_run(recorded[1])
    stored = run["stats"]["expert_bytes"]
    assert run["model"]["experts_dtype"] == run["stats"]["experts_dtype"] == run["summary"]["experts_dtype"] == "int4"
    assert run["model"]["stored_expert_bytes"] == run["summary"]["stored_expert_bytes"] == stored
    assert run["model"]["expert_bytes"] == plain["model"]["expert_bytes"] == 18432 and stored < 18432 * 0.3
    assert run["summary"]["device_pool_bytes"] == 5 * stored
    assert run["stats"]["bytes_loaded"] == stored * run["stats"]["uploads"]
    assert plain["summary"]["experts_dtype"] == "float32" and plain["summary"]["stored_expert_bytes"] == 18432
    row = f"int4, {report_text.fmt_bytes(stored)} per expert as stored and moved (18.00 KiB decoded to float32)"
    assert row in " ".join(result.stderr.split())
    assert row in (out / "report.html").read_text()
    assert "float32, 18.00 KiB per expert as stored and moved" in (recorded[1] / "report.html").read_text()
    # The second run reads the quantized copy the first one wrote beside the checkpoint.
    (copy,) = (folder / "moe_prefetch").glob("int4-*")
    again = runner.invoke(app, ["-v", *run_args(folder, "--cache-slots", "5", "--experts-dtype", "int4", "--json")])
    assert again.exit_code == 0, again.output
    assert "from the quantized copy" in again.stderr and "wrote the copy" not in again.stderr
    assert json.loads(again.stdout)["text"] == run["text"]


def test_load_times_share_the_trace_clock(recorded):
    """Each demand miss is copied while its layer call waits, so at least `misses` copies
    for that layer end inside the call; that holds only if loads and trace share a clock."""
    run = profiling.load_run(recorded[1] / "run.json")
    loads = run["loads"]
    assert loads and all(e["queued"] <= e["start"] <= e["end"] for e in loads)
    for call in run["trace"]:
        inside = [e for e in loads if e["tag"][0] == call["layer_idx"] and call["start"] <= e["end"] <= call["end"]]
        assert len(inside) >= call["misses"], call


def test_run_json_output(ckpt, runner):
    result = runner.invoke(app, run_args(ckpt, "--json", "--cache-slots", "4"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["summary"]["tokens_generated"] == MAX_NEW and data["text"] and data["report"] is None
    assert data["summary"]["device_pool_bytes"] == 4 * 18432


def test_run_reads_prompt_from_stdin_and_file(ckpt, runner, tmp_path):
    base = ["run", "--model", str(ckpt), "--max-new-tokens", str(MAX_NEW), "--device", "cpu", "--json"]
    piped = runner.invoke(app, base, input="def f(x):")
    assert piped.exit_code == 0, piped.output
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("def f(x):")
    from_file = runner.invoke(app, [*base, "--prompt-file", str(prompt_file)])
    assert from_file.exit_code == 0, from_file.output
    assert json.loads(piped.stdout)["text"] == json.loads(from_file.stdout)["text"]  # greedy: same prompt, same text


def reserved_bytes(ckpt, experts_dtype: str = "auto") -> int:
    """What a profile must hold besides the slots: weights, KV cache at the default context, the
    working buffer and the prefill peak (`fitting.fit`'s parts, each tested in test_fitting.py)."""
    from moe_prefetch.evidence.anatomy import anatomy
    from moe_prefetch.evidence.fitting import fit

    sized = fit(anatomy(str(ckpt)), experts_dtype, hw.load_profile("h200"))
    return sized.weights_bytes + sized.kv_bytes + sized.work_bytes + sized.prefill_bytes


def test_run_with_profile_sizes_the_cache(ckpt, runner, tmp_path, monkeypatch):
    expert = anatomy(str(ckpt)).expert_bytes("auto")
    reserved = reserved_bytes(ckpt)
    usable = reserved + 3 * expert + expert // 2  # room for 3.5 experts
    folder = tmp_path / "profiles"
    for name, memory in (("tiny-gpu", usable), ("too-small", reserved)):
        m = {
            "device": "Tiny",
            "free_bytes": memory,
            "total_bytes": memory,
            "h2d_by_mib": {1: 1e9},
            "hbm_bytes_per_s": 1e11,
            "bf16_flops": 1e12,
        }
        profile = measured_profile(name, m)
        hw.write_profile(dataclasses.replace(profile, usable_fraction=1.0), folder / f"{name}.toml")
    monkeypatch.setenv("MOE_PREFETCH_PROFILES", str(folder))
    result = runner.invoke(app, run_args(ckpt, "--profile", "tiny-gpu", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["device_pool_bytes"] == 3 * expert
    assert_one_line_error(runner.invoke(app, run_args(ckpt, "--profile", "too-small")), "larger profile")
    # With a longer context the KV cache takes more of the same card: fewer slots, said in the JSON of inspect.


def test_ctrl_c_stops_generation_and_still_writes_the_report(ckpt, runner, tmp_path, monkeypatch):
    token, finish, seen = profiling.RunRecorder.token, profiling.RunRecorder.finish, {}

    def token_then_sigint(self):
        record = token(self)
        if len(self.tokens) == 3:
            seen["signal"] = time.perf_counter()
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this (main) thread
        return record

    def timed_finish(self, interrupted=False):
        seen["stopped"] = time.perf_counter()
        finish(self, interrupted)

    monkeypatch.setattr(profiling.RunRecorder, "token", token_then_sigint)
    monkeypatch.setattr(profiling.RunRecorder, "finish", timed_finish)
    result = runner.invoke(
        app,
        [
            "run",
            "--model",
            str(ckpt),
            "--prompt",
            "x",
            "--max-new-tokens",
            "5000",
            "--device",
            "cpu",
            "--report",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 130, result.output
    assert seen["stopped"] - seen["signal"] < 1.0
    run = profiling.load_run(tmp_path / "r")
    assert run["interrupted"] and run["summary"]["interrupted"] and 3 <= len(run["tokens"]) <= 4
    assert "interrupted" in (tmp_path / "r" / "report.html").read_text()
    assert "interrupted after" in result.stderr


# -- report -------------------------------------------------------------------------------
def test_report_prints_tables_and_rerenders_html(recorded, runner, tmp_path):
    _, out = recorded
    result = runner.invoke(app, ["report", str(out / "run.json"), "--html", str(tmp_path / "again.html")])
    assert result.exit_code == 0, result.output
    for needle in ("per MoE layer", "where it ran", "hit rate", "cpu-thread", "next-gate"):
        assert needle in result.stdout
    assert (tmp_path / "again.html").read_text() == (out / "report.html").read_text()
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0  # the folder works too


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "does not exist"),
        ("{not json", "not a readable JSON"),
        ('{"schema": "something-else"}', "not a moe-prefetch run"),
        ('{"schema": "moe-prefetch/run", "version": 99}', "upgrade"),
        ('{"schema": "moe-prefetch/run", "version": 1, "measured_on": "cpu"}', "incomplete"),
    ],
)
def test_report_rejects_bad_files(runner, tmp_path, content, needle):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    assert_one_line_error(runner.invoke(app, ["report", str(path)]), needle)


# -- profiles, inspect, calibrate ---------------------------------------------------------------
def test_profiles_lists_and_shows(runner):
    listed = runner.invoke(app, ["profiles"])
    assert listed.exit_code == 0, listed.output
    for name in ("rtx3060-12gb", "rtx4090-24gb", "a100-40gb", "h100-80gb", "h200", "jetson-agx-orin-64gb"):
        assert name in listed.stdout
    shown = runner.invoke(app, ["profiles", "rtx3060-12gb"])
    assert shown.exit_code == 0, shown.output
    assert (
        "PCIe 3.0 x16" in shown.stdout and "12.0 GB/s" in shown.stdout and "h2d_bandwidth_bytes_per_s" in shown.stdout
    )
    assert_one_line_error(runner.invoke(app, ["profiles", "no-such-gpu"]), "unknown profile", "rtx3060-12gb")


def test_user_profiles_are_found_and_round_trip(runner, tmp_path, monkeypatch):
    m = {
        "device": "NVIDIA Test GPU",
        "free_bytes": 20 * 2**30,
        "total_bytes": 24 * 2**30,
        "h2d_by_mib": {1: 8e9, 256: 24.5e9},
        "hbm_bytes_per_s": 9e11,
        "bf16_flops": 1.5e14,
    }
    profile = measured_profile("test-gpu", m)
    path = hw.write_profile(profile, tmp_path / "mine" / "test-gpu.toml")
    assert hw.read_profile(path) == profile and profile.h2d_bandwidth_bytes_per_s == 24.5e9
    assert set(hw.read_profile(path).sources) == set(hw.NUMBERS)
    (tmp_path / "mine" / "broken.toml").write_text("name = ")
    monkeypatch.setenv("MOE_PREFETCH_PROFILES", str(tmp_path / "mine"))
    listed = runner.invoke(app, ["profiles"])
    assert listed.exit_code == 0 and "test-gpu" in listed.stdout and "h200" in listed.stdout
    assert "skipping profile" in listed.stderr  # the broken file is named, not fatal
    shown = runner.invoke(app, ["profiles", "test-gpu"])
    assert shown.exit_code == 0 and "24.5 GB/s" in shown.stdout and "256 MiB 24.50 GB/s" in shown.stdout
    assert_one_line_error(runner.invoke(app, ["profiles", "broken"]), "not valid TOML")


def test_inspect_matches_what_load_builds(ckpt, runner, recorded):
    result = runner.invoke(app, ["inspect", "--model", str(ckpt), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model, run = data["model"], profiling.load_run(recorded[1])
    assert (model["moe_layers"], model["experts_per_layer"], model["top_k"]) == (2, 8, 2)
    assert model["expert_bytes"] == run["stats"]["expert_bytes"] == 18432  # (2*48*32 + 32*48) fp32
    assert model["non_expert_bytes"] == run["summary"]["non_expert_bytes"]
    assert model["min_slots"] == 2 and model["recommended_slots"] == 4
    assert {f["profile"] for f in data["profiles"]} >= {"rtx3060-12gb", "h200"}
    assert all(f["verdict"] == "all resident" and f["slots"] == 16 for f in data["profiles"])
    text = runner.invoke(app, ["inspect", "--model", str(ckpt)])
    assert text.exit_code == 0 and "MixtralForCausalLM" in text.stdout and "top-2" in text.stdout
    assert "all resident" in text.stdout


def test_inspect_and_profiles_by_experts_dtype(recorded_int4, runner, tmp_path, monkeypatch):
    """Bytes per expert by experts_dtype are what a run with that dtype stores; a profile with room
    for 5.5 int4 experts fits 5 of them (and fewer fp32 or bf16 ones), in inspect and in run."""
    ckpt = recorded_int4[0]  # not the shared checkpoint: an int4 run writes its quantized copy beside it
    int4 = profiling.load_run(recorded_int4[2])["stats"]["expert_bytes"]
    usable = reserved_bytes(ckpt, "int4") + 5 * int4 + int4 // 2
    m = {
        "device": "Tiny",
        "free_bytes": usable,
        "total_bytes": usable,
        "h2d_by_mib": {1: 1e9},
        "hbm_bytes_per_s": 1e11,
        "bf16_flops": 1e12,
    }
    profile = dataclasses.replace(measured_profile("tiny-gpu", m), usable_fraction=1.0)
    hw.write_profile(profile, tmp_path / "profiles" / "tiny-gpu.toml")
    monkeypatch.setenv("MOE_PREFETCH_PROFILES", str(tmp_path / "profiles"))
    data = json.loads(runner.invoke(app, ["inspect", "--model", str(ckpt), "--json"]).stdout)
    by_dtype = data["model"]["expert_bytes_by_dtype"]
    assert by_dtype["int4"] == int4 and by_dtype["auto"] == by_dtype["fp32"] == 18432
    assert int4 < by_dtype["int8"] < by_dtype["bf16"] < by_dtype["auto"]
    (tiny,) = [p for p in data["profiles"] if p["profile"] == "tiny-gpu"]
    assert tiny["by_experts_dtype"]["int4"] == {"slots": 5, "verdict": "offloaded", "fits": True}
    for dtype in ("auto", "bf16", "int8"):  # each with its own working buffer beside the slots
        room = usable - reserved_bytes(ckpt, dtype)
        assert tiny["by_experts_dtype"][dtype]["slots"] == room // by_dtype[dtype] < 5
    h200 = next(p for p in data["profiles"] if p["profile"] == "h200")
    assert all(v["slots"] == 16 and v["verdict"] == "all resident" for v in h200["by_experts_dtype"].values())
    text = runner.invoke(app, ["inspect", "--model", str(ckpt)]).stdout
    assert "by --experts-dtype" in text and "5 of 16" in text and report_text.fmt_bytes(int4) in text
    result = runner.invoke(app, run_args(ckpt, "--profile", "tiny-gpu", "--experts-dtype", "int4", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["device_pool_bytes"] == 5 * int4


def test_quantize_writes_once_and_says_where(runner, tmp_path):
    folder = make_checkpoint(tmp_path / "m")
    result = runner.invoke(app, ["quantize", "--model", str(folder), "--experts-dtype", "int8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (copy,) = (folder / "moe_prefetch").glob("int8-*")
    copy_bytes = sum(f.stat().st_size for f in copy.iterdir())
    line = " ".join(result.stdout.split())
    # 16 experts of 18432 bytes in fp32 in the checkpoint
    assert f"wrote {copy}: experts 288.00 KiB -> {report_text.fmt_bytes(copy_bytes)} int8" in line
    again = runner.invoke(app, ["quantize", "--model", str(folder), "--experts-dtype", "int8", "--device", "cpu"])
    assert again.exit_code == 0 and f"already there, kept {copy}" in " ".join(again.stdout.split())
    assert_one_line_error(
        runner.invoke(app, ["quantize", "--model", str(folder), "--experts-dtype", "bf16", "--device", "cpu"]),
        "does not quantize",
    )
    assert_one_line_error(runner.invoke(app, ["quantize", "--model", str(folder), "--experts-dtype", "int3"]), "int3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_calibrate_needs_cuda(runner, tmp_path):
    result = runner.invoke(app, ["calibrate", "--out", str(tmp_path / "x.toml")])
    assert_one_line_error(result, "calibrate needs a CUDA device")
    assert not (tmp_path / "x.toml").exists()


# -- mistakes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "/no/such/model"], "does not exist"),
        (["--predictor", "crystal-ball"], "unknown predictor"),
        (["--cache-budget", "6 parsecs"], "cannot parse --cache-budget '6 parsecs'"),
        (["--cache-slots", "2", "--cache-budget", "1GiB"], "not --cache-budget and --cache-slots"),
        (["--lookahead", "99"], "lookahead"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--cache-slots", "many"], "--cache-slots"),
        (["--bogus"], "--bogus"),
        (["--profile", "no-such-gpu"], "unknown profile"),
        (["--cache-slots", "1"], "below top_k=2"),
        (["--experts-dtype", "int3"], "--experts-dtype int3 is not one of"),
    ],
)
def test_user_mistakes_are_one_line(ckpt, runner, args, needle):
    base = ["run", "--prompt", "x", "--device", "cpu", "--max-new-tokens", "2"]
    if "--model" not in args:
        base += ["--model", str(ckpt)]
    assert_one_line_error(runner.invoke(app, base + args), needle)


def test_missing_prompts_are_one_line(ckpt, runner, tmp_path):
    base = ["run", "--model", str(ckpt), "--device", "cpu"]
    assert_one_line_error(runner.invoke(app, base, input=""), "prompt is empty")
    assert_one_line_error(runner.invoke(app, [*base, "--prompt-file", str(tmp_path / "nope.txt")]), "--prompt-file")
    assert_one_line_error(
        runner.invoke(app, [*base, "--prompt", "a", "--prompt-file", "b"]), "not --prompt and --prompt-file"
    )


def test_model_without_tokenizer_is_one_line(ckpt, runner, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in ckpt.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            (folder / f.name).write_bytes(f.read_bytes())
    assert_one_line_error(runner.invoke(app, ["run", "--model", str(folder), "--prompt", "x"]), "tokenizer")


def test_debug_env_shows_the_exception(runner, monkeypatch):
    monkeypatch.setenv("MOE_PREFETCH_DEBUG", "1")
    result = runner.invoke(app, ["run", "--model", "/no/such/model", "--prompt", "x"])
    assert isinstance(result.exception, MoePrefetchError)


def test_every_command_and_option_has_help(runner):
    group = get_command(app)
    assert {"run", "report", "profiles", "calibrate", "inspect", "quantize"} <= set(group.commands)
    for name, command in group.commands.items():
        result = runner.invoke(app, [name, "--help"], env={"NO_COLOR": "1"})
        assert result.exit_code == 0 and "\x1b[" not in result.output, name
        assert command.help, name
        for param in command.params:
            assert param.help, f"{name} {param.name} has no help"
